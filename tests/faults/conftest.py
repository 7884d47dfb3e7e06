"""Fixtures of the fault-injection suite: a whole deployment (tests/e2e's), a protected lab machine
with a second disk the independent writer owns, and the knobs of the seeded kill schedule.

`SITERECOVERY_FAULT_KILLS` (default 12, each of the four components at least 3 times) and
`SITERECOVERY_FAULT_SEED` (default 1) set the schedule; `make faults` raises the kills for a soak.
`SITERECOVERY_FAULT_RESULTS` names a file the kill test appends its figures to.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
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


@pytest.fixture
def fault_env(tmp_path: Path, fault_options: FaultOptions) -> Iterator[Environment]:
    """The e2e deployment (configuration server, PS and MT per site, the lab), with `web1` given a
    second disk and protected."""
    env = Environment(
        tmp_path / "dr",
        disk_size=16 << 20,
        env={
            "SITERECOVERY_HEARTBEAT_TIMEOUT": str(HEARTBEAT_TIMEOUT),
            "SITERECOVERY_SYNC_TIMEOUT": "120",
            "SITERECOVERY_DRAIN_TIMEOUT": "120",
        },
    )
    try:
        env.start()
        env.lab_set("machine", MACHINE, f"disk+={DATA}:{data_disk_bytes(fault_options)}")
        # A crash point every second: a short run still lists many to check.
        env.api.post("/api/policies", {"name": "faults", "crash_consistent_frequency_seconds": 1})
        protect(env, MACHINE, policy="faults")
        yield env
    finally:
        env.stop()


def data_writer(env: Environment, options: FaultOptions, site: str = "onprem") -> RecordWriter:
    sock = runtime.agent_socket(runtime.run_dir(env.lab_dir, site, MACHINE), DATA)
    return RecordWriter(sock, DATA, capacity=data_disk_bytes(options) // RECORD)
