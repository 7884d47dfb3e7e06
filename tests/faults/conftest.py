"""Fixtures of the fault-injection suite: one deployment for the whole suite (the e2e one: a
configuration server, a process server and a master target per site, the lab), and the knobs of
the seeded kill schedule.

Each scenario protects its own lab machine, given a second disk that only the independent writer
writes. mt-cloud's retention volume is a small tmpfs (the full-volume case fills it) and it
advertises a relay the test controls (the link-cut case cuts it), so every scenario runs through
both. `SITERECOVERY_FAULT_KILLS` (default 12: each of the four components killed 3 times) and
`SITERECOVERY_FAULT_SEED` (default 1) set the kill schedule, `SITERECOVERY_FAULT_CUT_SECONDS`
(default 12) how long the link stays cut; `make faults` raises the kills and the cut (30 s) for a
soak and names `SITERECOVERY_FAULT_RESULTS`, the file the figures go to.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from siterecovery.demo.environment import Environment
from siterecovery.lab import runtime
from tests.conftest import IN_CI, stop_environment
from tests.e2e.conftest import HEARTBEAT_TIMEOUT, protect
from tests.faults.proxy import LinkProxy
from tests.faults.records import RECORD, RecordWriter
from tests.faults.report import Report

DATA = "data"  # the second disk: the writer's, nobody else writes it
POLICY = "faults"
VOLUME_BYTES = 256 << 20  # mt-cloud's retention volume


@dataclass(frozen=True)
class FaultOptions:
    kills: int
    seed: int
    results: Path | None
    # The short pass's cut outlasts the heartbeat timeout (4 s) three times and every reconnect
    # backoff (5 s at most); nothing in the product measures a cut's length, the soak's is 30 s.
    cut_seconds: float = 12.0


@dataclass
class FaultSite:
    env: Environment
    proxy: LinkProxy  # between ps-onprem and mt-cloud
    volume: Path  # mt-cloud's retention volume
    volume_is_tmpfs: bool
    options: FaultOptions

    def protect(self, machine: str) -> None:
        """Give the machine its second disk, power it on and protect it (1 s crash points)."""
        self.env.lab_set("machine", machine, f"disk+={DATA}:{data_disk_bytes(self.options)}")
        protect(self.env, machine, policy=POLICY)

    def writer(self, machine: str) -> RecordWriter:
        sock = runtime.agent_socket(runtime.run_dir(self.env.lab_dir, "onprem", machine), DATA)
        return RecordWriter(sock, DATA, capacity=data_disk_bytes(self.options) // RECORD)


@pytest.fixture(scope="session")
def fault_options() -> FaultOptions:
    results = os.environ.get("SITERECOVERY_FAULT_RESULTS", "")
    return FaultOptions(
        kills=int(os.environ.get("SITERECOVERY_FAULT_KILLS", "12")),
        seed=int(os.environ.get("SITERECOVERY_FAULT_SEED", "1")),
        results=Path(results) if results else None,
        cut_seconds=float(os.environ.get("SITERECOVERY_FAULT_CUT_SECONDS", "12")),
    )


@pytest.fixture(scope="session")
def fault_report(fault_options: FaultOptions) -> Iterator[Report]:
    """Figures of every scenario that ran; written out at the end when a results file is named."""
    report = Report(fault_options.seed, fault_options.kills)
    yield report
    if fault_options.results is not None and report.rows:
        report.write(fault_options.results)


def data_disk_bytes(options: FaultOptions) -> int:
    """Room for every record a run can write without wrapping (about 40 records per kill)."""
    records = max(4096, 200 * options.kills)
    return (records * RECORD + (1 << 20) - 1) & ~((1 << 20) - 1)


def _mount_tmpfs(path: Path) -> bool:
    mount = ["mount", "-t", "tmpfs", "-o", f"size={VOLUME_BYTES}", "tmpfs", str(path)]
    proc = subprocess.run(mount, capture_output=True, text=True)
    if proc.returncode != 0 and IN_CI:
        pytest.fail(f"the full-volume case needs a tmpfs (root): {proc.stderr.strip()}")
    return proc.returncode == 0


@pytest.fixture(scope="session")
def fault_site(tmp_path_factory: pytest.TempPathFactory, fault_options: FaultOptions) -> Iterator[FaultSite]:
    root = tmp_path_factory.mktemp("faults") / "dr"
    volume = root / "retention" / "cloud"
    volume.mkdir(parents=True)
    tmpfs = _mount_tmpfs(volume)
    proxy = LinkProxy((root / "components" / "mt-cloud" / "address").read_text).start()
    env = Environment(
        root,
        disk_size=16 << 20,
        env={
            "SITERECOVERY_HEARTBEAT_TIMEOUT": str(HEARTBEAT_TIMEOUT),
            "SITERECOVERY_SYNC_TIMEOUT": "120",
            "SITERECOVERY_DRAIN_TIMEOUT": "120",
        },
    )
    try:
        env.start()
        env.restart_component("mt-cloud", kill=False, extra=("--advertise", proxy.address))
        # A crash point every second: a short run still lists many to check.
        env.api.post("/api/policies", {"name": POLICY, "crash_consistent_frequency_seconds": 1})
        yield FaultSite(env, proxy, volume, tmpfs, fault_options)
    finally:
        stop_environment(env)
        proxy.stop()
        if tmpfs:
            subprocess.run(["umount", "-l", str(volume)], check=True, capture_output=True)
