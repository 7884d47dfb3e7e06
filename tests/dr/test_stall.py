"""A pair whose master target applies nothing while a backlog waits turns its item warning, then
critical, with an alert naming the pair and the hop; `/metrics` shows it. Thresholds are the
configurable ones, shortened; time is injected."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from sqlalchemy import select

from siterecovery.control.metrics import StateCollector
from siterecovery.dr import stall
from siterecovery.dr.monitor import evaluate
from siterecovery.store.models import Event
from tests.dr.conftest import Plane


@pytest.fixture(autouse=True)
def short_thresholds(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("SITERECOVERY_STALL_WARNING_SECONDS", "2")
    monkeypatch.setenv("SITERECOVERY_STALL_CRITICAL_SECONDS", "5")
    stall.WATCH.clear()
    yield
    stall.WATCH.clear()


def _alerts(plane: Plane) -> list[tuple[str, bool, str]]:
    with plane.cp.db.session() as s:
        rows = s.scalars(select(Event).where(Event.alert.is_(True), Event.code == "replication-stalled"))
        return [(e.severity, e.active, e.message) for e in rows]


def _active_alert_metrics() -> dict[tuple[str, ...], float]:
    family = next(f for f in StateCollector().collect() if f.name == "siterecovery_alerts_active")
    return {tuple(s.labels.values()): s.value for s in family.samples}


def test_stall_turns_warning_then_critical_and_clears(plane: Plane) -> None:
    t0 = plane.t0
    plane.report(captured=10, acked=10, applied=5, at=t0)  # the process server holds 5 writes
    evaluate(plane.cp, now=t0)
    assert plane.item().health == "normal" and not _alerts(plane)

    evaluate(plane.cp, now=t0 + 3)  # nothing applied for 3 s (warning at 2)
    assert plane.item().health == "warning"
    [(severity, active, message)] = _alerts(plane)
    assert (severity, active) == ("warning", True)
    assert "pair p1" in message and "process server -> master target" in message, message

    evaluate(plane.cp, now=t0 + 6)  # 6 s (critical at 5): the same alert escalates
    assert plane.item().health == "critical"
    assert [(a[0], a[1]) for a in _alerts(plane)] == [("critical", True)]
    assert _active_alert_metrics() == {("web1", "replication-stalled", "critical"): 1.0}

    plane.report(captured=10, acked=10, applied=10, at=t0 + 6.5)  # applying resumed and caught up
    evaluate(plane.cp, now=t0 + 7)
    assert plane.item().health == "normal"
    assert [(a[0], a[1]) for a in _alerts(plane)] == [("critical", False)]
    assert _active_alert_metrics() == {}


def test_stall_names_the_agent_hop_when_nothing_is_acknowledged(plane: Plane) -> None:
    t0 = plane.t0
    plane.report(captured=20, acked=10, applied=10, at=t0)  # the agent cannot deliver
    evaluate(plane.cp, now=t0)
    evaluate(plane.cp, now=t0 + 3)
    [(severity, _active, message)] = _alerts(plane)
    assert severity == "warning" and "agent -> process server" in message, message

    # Writes keep being applied slowly: that is lag (RPO's business), not a stall.
    for step in range(1, 6):
        plane.report(captured=20 + step, acked=10 + step, applied=10 + step, at=t0 + 3 + step)
        evaluate(plane.cp, now=t0 + 3 + step)
    assert plane.item().health == "normal"


def test_a_pair_held_at_a_failover_point_is_not_a_stall(plane: Plane) -> None:
    from siterecovery.dr import items as repo

    rep = repo.load("it").record.replication
    assert rep is not None
    plane.set_record(replication=rep.model_copy(update={"points": {"p1": "disk:app:4"}}))
    plane.report(captured=10, acked=10, applied=5, at=plane.t0)  # applying stops while it is held
    evaluate(plane.cp, now=plane.t0)
    evaluate(plane.cp, now=plane.t0 + 10)
    assert plane.item().health == "normal" and not _alerts(plane)
