"""Fixtures of the fault-injection suite: a whole deployment (tests/e2e's), a protected lab machine
with a second disk the independent writer owns, and the knobs of the seeded kill schedule.

`SITERECOVERY_FAULT_KILLS` (default 12, each of the four components at least 3 times) and
`SITERECOVERY_FAULT_SEED` (default 1) set the schedule; `make faults` raises the kills for a soak.
`SITERECOVERY_FAULT_RESULTS` names a file the kill test appends its figures to.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from siterecovery.demo.environment import Environment
from siterecovery.lab import runtime
from tests.e2e.conftest import HEARTBEAT_TIMEOUT, protect
from tests.faults.records import RECORD, RecordWriter
from tests.faults.report import Report

MACHINE = "web1"
DATA = "data"  # the second disk: the writer's, nobody else writes it


@dataclass(frozen=True)
class FaultOptions:
    kills: int
    seed: int
    results: Path | None


@pytest.fixture(scope="session")
def fault_options() -> FaultOptions:
    results = os.environ.get("SITERECOVERY_FAULT_RESULTS", "")
    return FaultOptions(
        kills=int(os.environ.get("SITERECOVERY_FAULT_KILLS", "12")),
        seed=int(os.environ.get("SITERECOVERY_FAULT_SEED", "1")),
        results=Path(results) if results else None,
    )


def data_disk_bytes(options: FaultOptions) -> int:
    """Room for every record the run can write without wrapping (about 40 records per kill)."""
    records = max(4096, 200 * options.kills)
    return (records * RECORD + (1 << 20) - 1) & ~((1 << 20) - 1)


@pytest.fixture(scope="session")
def fault_report(fault_options: FaultOptions) -> Iterator[Report]:
    """Figures of every scenario that ran; written out at the end when a results file is named."""
    report = Report(fault_options.seed, fault_options.kills)
    yield report
    if fault_options.results is not None and report.rows:
        report.write(fault_options.results)


Deploy = Callable[..., Environment]


def env_root(tmp_path: Path) -> Path:
    """Where `deploy` puts the deployment of a test."""
    return tmp_path / "dr"


@pytest.fixture
def deploy(tmp_path: Path, fault_options: FaultOptions) -> Iterator[Deploy]:
    """Builds the e2e deployment (configuration server, PS and MT per site, the lab) with `web1`
    given a second disk and protected. `before_start(root)` runs before anything starts (e.g. to
    mount the retention volume); `mt_cloud_args` are added to mt-cloud's command line."""
    envs: list[Environment] = []

    def build(
        before_start: Callable[[Path], None] | None = None, mt_cloud_args: tuple[str, ...] = ()
    ) -> Environment:
        env = Environment(
            env_root(tmp_path),
            disk_size=16 << 20,
            env={
                "SITERECOVERY_HEARTBEAT_TIMEOUT": str(HEARTBEAT_TIMEOUT),
                "SITERECOVERY_SYNC_TIMEOUT": "120",
                "SITERECOVERY_DRAIN_TIMEOUT": "120",
            },
        )
        envs.append(env)
        if before_start is not None:
            before_start(env.root)
        env.start()
        if mt_cloud_args:
            env.restart_component("mt-cloud", kill=False, extra=mt_cloud_args)
        env.lab_set("machine", MACHINE, f"disk+={DATA}:{data_disk_bytes(fault_options)}")
        # A crash point every second: a short run still lists many to check.
        env.api.post("/api/policies", {"name": "faults", "crash_consistent_frequency_seconds": 1})
        protect(env, MACHINE, policy="faults")
        return env

    try:
        yield build
    finally:
        for env in envs:
            env.stop()


@pytest.fixture
def fault_env(deploy: Deploy) -> Environment:
    return deploy()


def data_writer(env: Environment, options: FaultOptions, site: str = "onprem") -> RecordWriter:
    sock = runtime.agent_socket(runtime.run_dir(env.lab_dir, site, MACHINE), DATA)
    return RecordWriter(sock, DATA, capacity=data_disk_bytes(options) // RECORD)
