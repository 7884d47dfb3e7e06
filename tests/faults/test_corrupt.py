"""One corrupt byte at rest, under a live writer, heals by itself with an alert and loses nothing:
first in the process server's cache (the master target refuses the frame, it is read again from
the source disk), then in the master target's journal (the points that need the damaged record
are listed unusable and refused, never served; the newest state is intact)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from tests.e2e.conftest import run_job
from tests.faults.checks import (
    active_alerts,
    alerts_ever,
    assert_sound,
    data_pair,
    fail_over_and_check,
    mt_pair,
    points_summary,
    records_checked,
    wait,
    wait_caught_up,
)
from tests.faults.conftest import DATA, FaultSite
from tests.faults.corrupt import cached_writes, flip_cached_write, flip_journal_record
from tests.faults.points import listed_points
from tests.faults.report import Report, Row

MACHINE = "app1"


def test_corrupt_bytes_heal_with_an_alert(
    fault_site: FaultSite, fault_report: Report, tmp_path: Path
) -> None:
    env = fault_site.env
    fault_site.protect(MACHINE)
    started = time.monotonic()
    writer = fault_site.writer(MACHINE).start()
    writer.wait_written(64)
    pair_id = data_pair(env, MACHINE)["pair_id"]

    # 1. The process server's cache: with the master target down, frames wait in the cache; one
    # payload byte is flipped; both restart and the process server reads the frame back.
    applied = int(mt_pair(env, pair_id)["applied_seq"])
    env.stop_component("mt-cloud")
    cache = env.root / "components" / "ps-onprem" / "cache" / "cache" / pair_id
    writer.wait_written(writer.written + 64)
    wait(lambda: any(w[3] > applied for w in cached_writes(cache)), "frames in the cache")
    in_cache = flip_cached_write(cache, applied)
    assert in_cache is not None
    env.restart_component("ps-onprem")
    env.restart_component("mt-cloud", kill=False)
    wait(lambda: alerts_ever(env, "frame-refused"), "the frame-refused alert")
    alert = alerts_ever(env, "frame-refused")[0]
    assert str(in_cache.seq) in alert["message"] and DATA in alert["message"], alert
    wait(lambda: not active_alerts(env, "frame-refused"), "the refused frame to heal")
    wait_caught_up(env, MACHINE)

    # 2. The master target's journal: an undo record an older crash point needs is damaged.
    def crash_points() -> list[dict[str, Any]]:
        return [p for p in listed_points(env, MACHINE) if p["kind"] == "crash" and not p.get("unusable")]

    wait(lambda: len(crash_points()) >= 3, "three usable crash points")
    older = crash_points()[-1]  # the oldest usable one
    older_seq = int(older["disks"][pair_id].rsplit(":", 1)[1])
    journal = fault_site.volume / "siterecovery-journal" / pair_id
    in_journal = flip_journal_record(journal, older_seq, int(mt_pair(env, pair_id)["applied_seq"]))
    assert in_journal is not None
    # A test failover to that point needs the damaged record: refused, never served.
    job = run_job(env, f"/api/replicatedItems/{MACHINE}/failover", {"point": older["id"], "test": True})
    assert job["state"] == "failed" and "recovery-point-unusable" in str(job), job
    wait(lambda: alerts_ever(env, "recovery-points-unusable"), "the recovery-points-unusable alert")
    listed = {p["id"]: p for p in listed_points(env, MACHINE)}
    assert listed[older["id"]].get("unusable"), listed[older["id"]]

    job, recovered, points = fail_over_and_check(env, MACHINE, writer, tmp_path / "points")
    fault_report.add(
        Row(
            "a byte flipped in the PS cache, then one in the MT journal, then planned failover",
            f"PS cache (seq {in_cache.seq}), MT journal (seq {in_journal.seq})",
            flushed=writer.flushed,
            recovered=recovered.prefix,
            points=points_summary(points),
            records_checked=records_checked(recovered, points),
            seconds=time.monotonic() - started,
        )
    )
    assert_sound(job, writer, recovered, points)
