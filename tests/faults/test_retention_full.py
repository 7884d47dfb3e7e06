"""The master target's retention volume fills up under a live writer: applying pauses with an
alert, the writes wait upstream, and once space is freed replication catches up, losing nothing.

The volume is a small tmpfs mounted on mt-cloud's retention directory (the real ENOSPC path, not a
quota), filled by a file the test writes and later deletes as an operator freeing space would.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import IN_CI
from tests.faults.checks import active_alerts, fail_over_and_check
from tests.faults.conftest import Deploy, FaultOptions, data_writer, env_root
from tests.faults.report import Report, Row

VOLUME_BYTES = 64 << 20
LEFT_FREE = 256 << 10  # what the filler leaves: a few dozen records' worth of journal


@pytest.fixture
def small_volume(tmp_path: Path) -> Iterator[Path]:
    """A 64 MiB tmpfs where mt-cloud's retention volume will be (needs mount rights: root)."""
    path = env_root(tmp_path) / "retention" / "cloud"
    path.mkdir(parents=True)
    mount = ["mount", "-t", "tmpfs", "-o", f"size={VOLUME_BYTES}", "tmpfs", str(path)]
    proc = subprocess.run(mount, capture_output=True, text=True)
    if proc.returncode != 0:
        message = f"cannot mount a tmpfs for the full-volume case: {proc.stderr.strip()}"
        pytest.fail(message) if IN_CI else pytest.skip(message)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True, capture_output=True)


def _wait(check: Callable[[], object], what: str, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.25)


def test_full_retention_volume_pauses_and_catches_up(
    small_volume: Path, deploy: Deploy, fault_options: FaultOptions, fault_report: Report
) -> None:
    env = deploy()
    started = time.monotonic()
    writer = data_writer(env, fault_options).start()
    writer.wait_written(32)

    stat = os.statvfs(small_volume)
    filler = small_volume / "filler"
    with open(filler, "wb") as f:
        os.posix_fallocate(f.fileno(), 0, stat.f_bavail * stat.f_frsize - LEFT_FREE)
    _wait(lambda: active_alerts(env, "retention-volume-full"), "the retention-volume-full alert")
    paused_at = writer.written
    writer.wait_written(paused_at + 128)  # the guest is not stopped: its writes wait upstream

    filler.unlink()  # the operator frees space
    _wait(lambda: not active_alerts(env, "retention-volume-full"), "the alert to clear")
    writer.wait_written(writer.written + 32)
    recovered = fail_over_and_check(env, writer)
    fault_report.add(
        Row(
            "retention volume full, space freed, then planned failover",
            "volume full x1",
            flushed=writer.flushed,
            recovered=recovered.prefix,
            records_checked=recovered.prefix,
            seconds=time.monotonic() - started,
        )
    )
