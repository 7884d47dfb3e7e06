"""The link between the process server and the master target cut (12 s in `make test`, 30 s in
`make faults`), then the master target's retention volume full, under a live writer: replication
catches up after each, the full volume pauses applying with an alert, and every flushed record
reaches the recovered disk.

The link runs through a relay the test controls (mt-cloud advertises it); the volume is a small
tmpfs, filled by a file the test writes and then deletes as an operator freeing space would (the
real ENOSPC path, not a quota).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from tests.faults.checks import (
    active_alerts,
    assert_sound,
    fail_over_and_check,
    points_summary,
    records_checked,
    wait,
    wait_caught_up,
)
from tests.faults.conftest import FaultSite
from tests.faults.report import Report, Row

MACHINE = "db1"
LEFT_FREE = 4096  # what the filler leaves on the volume: less than one sync of the journal needs


def test_link_cut_then_full_volume_catch_up(
    fault_site: FaultSite, fault_report: Report, tmp_path: Path
) -> None:
    env, proxy = fault_site.env, fault_site.proxy
    fault_site.protect(MACHINE)
    started = time.monotonic()
    assert proxy.forwarded > 0  # the initial replication went through the relay
    writer = fault_site.writer(MACHINE).start()
    writer.wait_written(64)

    # The link is cut: the guest goes on writing, nothing crosses to the master target.
    proxy.cut()
    during = proxy.forwarded
    cut_until = time.monotonic() + fault_site.options.cut_seconds
    while time.monotonic() < cut_until:
        writer.wait_written(writer.written + 1)
        time.sleep(0.5)
    assert proxy.forwarded == during
    proxy.restore()
    wait_caught_up(env, MACHINE)
    assert proxy.forwarded > during  # it caught up through the link, not around it
    faults = [f"link cut {fault_site.options.cut_seconds:g} s"]

    if fault_site.volume_is_tmpfs:
        # The retention volume fills up: applying pauses with an alert, the writes wait upstream.
        stat = os.statvfs(fault_site.volume)
        filler = fault_site.volume / "filler"
        with open(filler, "wb") as f:
            os.posix_fallocate(f.fileno(), 0, stat.f_bavail * stat.f_frsize - LEFT_FREE)
        try:
            wait(lambda: active_alerts(env, "retention-volume-full"), "the retention-volume-full alert")
            writer.wait_written(writer.written + 128)
        finally:
            filler.unlink()  # the operator frees space
        wait(lambda: not active_alerts(env, "retention-volume-full"), "the alert to clear")
        wait_caught_up(env, MACHINE)
        faults.append("retention volume full")

    job, recovered, points = fail_over_and_check(env, MACHINE, writer, tmp_path / "points")
    fault_report.add(
        Row(
            "PS-MT link cut, then the retention volume full, then planned failover",
            ", ".join(faults),
            flushed=writer.flushed,
            recovered=recovered.prefix,
            points=points_summary(points),
            records_checked=records_checked(recovered, points),
            seconds=time.monotonic() - started,
        )
    )
    assert_sound(job, writer, recovered, points)
    if not fault_site.volume_is_tmpfs:
        pytest.skip("the full-volume half needs a tmpfs (mount, as root); the link half passed")
