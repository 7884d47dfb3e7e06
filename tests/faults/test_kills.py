"""kill -9 of every component under a live writer: nothing flushed is lost, every point is clean.

The writer (tests/faults/records.py, not the product's code) writes self-verifying records to
web1's second disk through its agent's NBD export, while a seeded schedule kills the agent, the
process server, the master target and the configuration server and restarts them as an operator
would. After a planned failover every record flushed before the shutdown must be on the recovered
disk, and every crash point the master target lists, materialised the way the product does, must
be a clean prefix of the records.
"""

from __future__ import annotations

import time
from pathlib import Path

from siterecovery.demo.environment import Environment
from tests.e2e.conftest import run_job
from tests.faults.conftest import DATA, MACHINE, FaultOptions, data_writer
from tests.faults.points import check_crash_points, listed_points
from tests.faults.records import check_image
from tests.faults.report import Report, Row
from tests.faults.schedule import Component, Injector, make_schedule


def test_kills_under_a_live_writer(
    fault_env: Environment, fault_options: FaultOptions, fault_report: Report, tmp_path: Path
) -> None:
    env = fault_env
    started = time.monotonic()
    writer = data_writer(env, fault_options).start()
    writer.wait_written(32)
    injector = Injector(env, MACHINE)
    log: list[str] = []  # where each kill fell in the writer's records, for a failure message
    for kill in make_schedule(fault_options.kills, fault_options.seed):
        writer.wait_written(writer.written + kill.after_records)
        log.append(f"{kill.component} killed at record {writer.written}")
        injector.kill_and_restart(kill.component)
    writer.wait_written(writer.written + 32)  # writes flow again after the last restart
    writer.stop()  # the writer's shutdown: its last records are flushed
    listed = listed_points(env, MACHINE)

    job = run_job(env, f"/api/replicatedItems/{MACHINE}/failover", {"planned": True})
    held = env.api.get(f"/api/replicatedItems/{MACHINE}")["details"].get("held")
    assert held is not None, f"the failover did not happen: {job}"
    pair = next(p for p in held["replication"]["pairs"] if p["disk"] == DATA)
    recovered = check_image(Path(pair["target"]), writer.run_id, writer.capacity)

    env.stop_component("mt-cloud")  # the journal has one owner: check the points offline
    points = check_crash_points(
        listed,
        env.root / "retention" / "cloud",
        pair["pair_id"],
        Path(pair["target"]),
        writer.run_id,
        writer.capacity,
        tmp_path / "points",
    )
    row = Row(
        "kill -9 under a live writer, then planned failover",
        ", ".join(f"{c} x{n}" for c, n in sorted(injector.survived.items())),
        flushed=writer.flushed,
        recovered=recovered.prefix,
        points=f"{sum(p.verdict is not None and p.verdict.clean for p in points)}/{len(points)}",
        records_checked=recovered.prefix + sum(p.verdict.prefix for p in points if p.verdict),
        seconds=time.monotonic() - started,
    )
    fault_report.add(row)

    assert all(injector.survived[c] >= min(3, fault_options.kills // len(Component)) for c in Component)
    assert recovered.clean, f"recovered disk: {recovered.problem}; {log}"
    assert recovered.prefix >= writer.flushed, f"{row.lost} flushed records lost: {row}; {log}"
    bad = [p for p in points if p.verdict is None or not p.verdict.clean]
    assert not bad, f"crash points that are not a clean prefix: {bad}; {log}"
    assert len(points) >= 2, points  # the run lasted several crash-point intervals
    assert job["state"] == "succeeded", job
