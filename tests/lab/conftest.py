"""Lab test fixtures: a fresh small lab per test whose machine processes are always stopped."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from siterecovery.fabrics.lab_build import create_lab
from siterecovery.lab import runtime
from siterecovery.lab.fabric import LabFabric
from siterecovery.lab.guest import GuestStatus

DISK_SIZE = 16 * 1024 * 1024


# Until the main CLI registers `lab`, the commands run through this tiny console script of its own.
@dataclass(frozen=True)
class Lab:
    path: Path

    def fabric(self, site: str = "onprem") -> LabFabric:
        return LabFabric(self.path, site)

    def cli(self, *args: str, check: bool = True, columns: int = 200) -> subprocess.CompletedProcess[str]:
        """Run `siterecovery lab ARGS` as a real process (piped, on a terminal `columns` wide)."""
        cmd = [str(Path(sys.executable).with_name("siterecovery")), "lab", *args]
        proc = subprocess.run(
            cmd, capture_output=True, text=True, timeout=60, env={**os.environ, "COLUMNS": str(columns)}
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"lab {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
            )
        return proc


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    path = tmp_path / "lab"
    create_lab(path, DISK_SIZE)
    yield Lab(path)
    runtime.stop_all(path)


def wait_for(what: str, probe: Callable[[], bool], timeout: float = 30.0) -> None:
    """Wait until `probe()` holds; a test fails (never hangs) when it does not."""
    deadline = time.monotonic() + timeout
    while not probe():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def wait_records(lab: Lab, machine: str, count: int, site: str = "onprem") -> GuestStatus:
    """Wait until the machine's guest has flushed at least `count` records."""

    def flushed() -> bool:
        status = runtime.guest_status(lab.path, site, machine)
        if status is not None and status.error:
            raise AssertionError(f"guest of {machine} failed: {status.error}")
        return status is not None and status.flushed >= count

    wait_for(f"{machine} to write {count} records", flushed)
    status = runtime.guest_status(lab.path, site, machine)
    assert status is not None
    return status
