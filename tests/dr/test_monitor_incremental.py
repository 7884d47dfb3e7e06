"""POL-2: the RPO monitor evaluates only items whose inputs changed or whose computed crossing came
(`dr.monitor_state`), yet an item that crosses its RPO threshold — or whose pair stalls past a stall
threshold — with no new report at all is still turned warning/critical and alerted, at the first
pass at or after the crossing. Real database; time is injected; evaluated items are counted."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from sqlalchemy import select, update

from siterecovery.dr import stall
from siterecovery.dr.monitor import run_pass
from siterecovery.store.models import Event, Policy
from tests.dr.conftest import Plane


@pytest.fixture(autouse=True)
def short_thresholds(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("SITERECOVERY_STALL_WARNING_SECONDS", "2")
    monkeypatch.setenv("SITERECOVERY_STALL_CRITICAL_SECONDS", "5")
    stall.WATCH.clear()
    yield
    stall.WATCH.clear()


def _alerts(plane: Plane, code: str) -> list[tuple[str, bool]]:
    with plane.cp.db.session() as s:
        rows = s.scalars(select(Event).where(Event.alert.is_(True), Event.code == code))
        return [(e.severity, e.active) for e in rows]


def test_an_item_crossing_its_rpo_threshold_with_no_new_report_is_alerted(plane: Plane) -> None:
    t0 = plane.t0
    with plane.cp.db.session() as s:
        s.execute(update(Policy).values(rpo_threshold_seconds=60))
    plane.report(captured=10, acked=10, applied=10, at=t0)  # caught up; nobody reports again

    assert run_pass(plane.cp, now=t0 + 1).evaluated == 1  # the first pass: every item
    quiet = run_pass(plane.cp, now=t0 + 1.5)
    assert (quiet.evaluated, quiet.items) == (0, 1)  # nothing changed, nothing due
    assert plane.item().health == "normal"

    crossed = run_pass(plane.cp, now=t0 + 60.5)  # RPO 60.5 s > 60 s, with no new input
    assert (crossed.changed, crossed.due, crossed.evaluated) == (0, 1, 1)
    assert plane.item().health == "warning" and plane.item().rpo_seconds == 60.5
    assert _alerts(plane, "rpo-threshold-exceeded") == [("warning", True)]

    run_pass(plane.cp, now=t0 + 100)
    assert plane.item().health == "warning"
    doubled = run_pass(plane.cp, now=t0 + 121)  # over twice the threshold: the alert escalates
    assert doubled.due == 1 and plane.item().health == "critical"
    assert _alerts(plane, "rpo-threshold-exceeded") == [("critical", True)]

    plane.report(captured=11, acked=11, applied=11, at=t0 + 130)  # a report: evaluated as changed
    fresh = run_pass(plane.cp, now=t0 + 130.5)
    assert fresh.changed == 1 and plane.item().health == "normal"
    assert _alerts(plane, "rpo-threshold-exceeded") == [("critical", False)]


def test_a_pair_stalling_with_no_new_report_turns_warning_then_critical(plane: Plane) -> None:
    t0 = plane.t0
    plane.report(captured=10, acked=10, applied=5, at=t0)  # a backlog; nothing applied from now on
    run_pass(plane.cp, now=t0)
    assert run_pass(plane.cp, now=t0 + 1).evaluated == 0
    assert plane.item().health == "normal"

    warned = run_pass(plane.cp, now=t0 + 2.5)  # stalled 2.5 s (warning at 2)
    assert (warned.changed, warned.due) == (0, 1)
    assert plane.item().health == "warning"
    assert _alerts(plane, "replication-stalled") == [("warning", True)]

    assert run_pass(plane.cp, now=t0 + 4).evaluated <= 1  # the alert it opened, read back once
    escalated = run_pass(plane.cp, now=t0 + 5.5)
    assert escalated.due == 1 and plane.item().health == "critical"
    assert _alerts(plane, "replication-stalled") == [("critical", True)]


def test_a_backlog_appearing_long_after_the_last_look_starts_its_stall_clock_then(plane: Plane) -> None:
    """An idle pair is not looked at for a long time; when its agent reports a backlog, the stall
    counts from that pass, not from the last time the monitor looked at the pair."""
    t0 = plane.t0
    plane.report(captured=10, acked=10, applied=10, at=t0)
    run_pass(plane.cp, now=t0)
    assert run_pass(plane.cp, now=t0 + 50).evaluated <= 1  # at most its stored RPO rewritten
    plane.report(captured=12, acked=12, applied=10, at=t0 + 100)
    run_pass(plane.cp, now=t0 + 100)
    assert plane.item().health == "normal" and not _alerts(plane, "replication-stalled")
    run_pass(plane.cp, now=t0 + 102.5)
    assert plane.item().health == "warning"
