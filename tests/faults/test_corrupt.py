"""One corrupt byte at rest, under a live writer: it heals by itself with an alert and loses
nothing — in the process server's cache (the frame is refused downstream and read again from the
source) and in the master target's journal (the points that need the damaged record are listed
unusable and refused, never served; the newest state is intact)."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from siterecovery.demo.environment import Environment
from tests.e2e.conftest import run_job
from tests.faults.checks import (
    active_alerts,
    alerts_ever,
    assert_points_sound,
    check_listed_points,
    fail_over_and_check,
    points_summary,
)
from tests.faults.conftest import DATA, MACHINE, Deploy, FaultOptions, data_writer
from tests.faults.corrupt import Flipped, cached_writes, flip_cached_write, flip_journal_record
from tests.faults.points import listed_points
from tests.faults.report import Report, Row

TIMEOUT = 120.0


def _wait(check: Callable[[], object], what: str, timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.25)


def _pair(env: Environment) -> dict[str, Any]:
    reps = env.api.get(f"/api/replicatedItems/{MACHINE}")["details"]["replication"]["pairs"]
    pair: dict[str, Any] = next(p for p in reps if p["disk"] == DATA)
    return pair


def _mt_pair(env: Environment, pair_id: str) -> dict[str, Any]:
    for server in env.api.get("/api/servers"):
        if server["name"] == "mt-cloud":
            for p in server["stats"].get("pairs", []):
                if p["pair_id"] == pair_id:
                    return dict(p)
    return {}


def test_corrupt_byte_in_the_process_server_cache_heals_with_an_alert(
    deploy: Deploy, fault_options: FaultOptions, fault_report: Report, tmp_path: Path
) -> None:
    env = deploy()
    started = time.monotonic()
    writer = data_writer(env, fault_options).start()
    writer.wait_written(64)
    pair_id = _pair(env)["pair_id"]
    applied = int(_mt_pair(env, pair_id)["applied_seq"])
    env.stop_component("mt-cloud")  # frames now wait in the process server's cache
    cache = env.root / "components" / "ps-onprem" / "cache" / "cache" / pair_id
    writer.wait_written(writer.written + 64)
    _wait(lambda: any(w[3] > applied for w in cached_writes(cache)), "frames in the cache")
    flipped = flip_cached_write(cache, applied)
    assert flipped is not None
    env.restart_component("ps-onprem")  # it reads the damaged frame back from its disk
    env.restart_component("mt-cloud")

    _wait(lambda: alerts_ever(env, "frame-refused"), "the frame-refused alert")
    alert = alerts_ever(env, "frame-refused")[0]
    assert str(flipped.seq) in alert["message"] and DATA in alert["message"], alert
    _wait(lambda: not active_alerts(env, "frame-refused"), "the refused frame to heal")
    writer.wait_written(writer.written + 32)
    _finish(env, writer, fault_report, tmp_path, "corrupt byte in the process-server cache", flipped, started)


def test_corrupt_byte_in_the_master_target_journal_is_never_served(
    deploy: Deploy, fault_options: FaultOptions, fault_report: Report, tmp_path: Path
) -> None:
    env = deploy()
    started = time.monotonic()
    writer = data_writer(env, fault_options).start()
    pair_id = _pair(env)["pair_id"]

    def crash_points() -> list[dict[str, Any]]:
        return [p for p in listed_points(env, MACHINE) if p["kind"] == "crash"]

    _wait(lambda: len(crash_points()) >= 3, "three crash points")
    older = crash_points()[-1]  # the oldest listed
    older_seq = int(older["disks"][pair_id].rsplit(":", 1)[1])
    journal = env.root / "retention" / "cloud" / "siterecovery-journal" / pair_id
    applied = int(_mt_pair(env, pair_id)["applied_seq"])
    flipped = flip_journal_record(journal, older_seq, applied)  # an undo record the point needs
    assert flipped is not None

    # A test failover to the older point needs the damaged record: refused, never served.
    job = run_job(env, f"/api/replicatedItems/{MACHINE}/failover", {"point": older["id"], "test": True})
    assert job["state"] == "failed", job
    assert "recovery-point-unusable" in str(job), job
    _wait(lambda: alerts_ever(env, "recovery-points-unusable"), "the recovery-points-unusable alert")
    listed = {p["id"]: p for p in listed_points(env, MACHINE)}
    assert listed[older["id"]].get("unusable"), listed[older["id"]]
    _finish(env, writer, fault_report, tmp_path, "corrupt byte in the MT journal", flipped, started)


def _finish(
    env: Environment,
    writer: Any,
    report: Report,
    tmp_path: Path,
    scenario: str,
    flipped: Flipped,
    started: float,
) -> None:
    """Stop the writer, fail over, check the recovered disk and every listed crash point."""
    writer.stop()
    listed = listed_points(env, MACHINE)
    recovered = fail_over_and_check(env, writer)
    points = check_listed_points(env, listed, writer, tmp_path / "points")
    report.add(
        Row(
            f"{scenario}, then planned failover",
            f"1 byte flipped (seq {flipped.seq})",
            flushed=writer.flushed,
            recovered=recovered.prefix,
            points=points_summary(points),
            records_checked=recovered.prefix + sum(p.verdict.prefix for p in points if p.verdict),
            seconds=time.monotonic() - started,
        )
    )
    assert_points_sound(points)
