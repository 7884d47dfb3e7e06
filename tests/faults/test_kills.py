"""kill -9 of every component under a live writer: nothing flushed is lost, every point is clean.

The writer (tests/faults/records.py, not the product's code) writes self-verifying records to
web1's second disk through its agent's NBD export, while a seeded schedule kills the agent, the
process server, the master target and the configuration server and restarts them as an operator
would. After a planned failover every record flushed before the shutdown must be on the recovered
disk, and every crash point listed before it, materialised the way the product does, must be a
clean prefix of the records.
"""

from __future__ import annotations

import time
from pathlib import Path

from tests.faults.checks import assert_sound, fail_over_and_check, points_summary, records_checked
from tests.faults.conftest import FaultSite
from tests.faults.report import Report, Row
from tests.faults.schedule import Component, Injector, make_schedule

MACHINE = "web1"


def test_kills_under_a_live_writer(fault_site: FaultSite, fault_report: Report, tmp_path: Path) -> None:
    env, options = fault_site.env, fault_site.options
    fault_site.protect(MACHINE)
    started = time.monotonic()
    writer = fault_site.writer(MACHINE).start()
    writer.wait_written(32)
    injector = Injector(env, MACHINE)
    log: list[str] = []  # where each kill fell in the writer's records, for a failure message
    for kill in make_schedule(options.kills, options.seed):
        writer.wait_written(writer.written + kill.after_records)
        log.append(f"{kill.component} at record {writer.written}")
        injector.kill_and_restart(kill.component)
    writer.wait_written(writer.written + 32)  # writes flow again after the last restart

    job, recovered, points = fail_over_and_check(env, MACHINE, writer, tmp_path / "points")
    fault_report.add(
        Row(
            f"kill -9 under a live writer (seed {options.seed}), then planned failover",
            ", ".join(f"{c} x{n}" for c, n in sorted(injector.survived.items())),
            flushed=writer.flushed,
            recovered=recovered.prefix,
            points=points_summary(points),
            records_checked=records_checked(recovered, points),
            seconds=time.monotonic() - started,
        )
    )
    assert all(injector.survived[c] >= min(3, options.kills // len(Component)) for c in Component)
    try:
        assert_sound(job, writer, recovered, points)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\nkills: {log}") from None
