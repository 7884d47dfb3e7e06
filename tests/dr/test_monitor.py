"""POL-2: RPO above the policy's threshold turns the item warning/critical and raises an alert that
clears when RPO recovers. The monitor runs on a real configuration-server database; time is injected."""

from __future__ import annotations

import time
from pathlib import Path

from sqlalchemy import select

from siterecovery.config import load_server_config
from siterecovery.dataplane.assignments import (
    AgentStats,
    MasterTargetPairStats,
    MasterTargetStats,
    PairState,
    PairStats,
)
from siterecovery.dr.monitor import evaluate
from siterecovery.store.context import open_control_plane
from siterecovery.store.models import Component, Event, ReplicatedItem
from tests.dr.conftest import gold_policy, protected_item


def _alerts(cp: object) -> list[Event]:
    with cp.db.session() as s:  # type: ignore[attr-defined]
        return list(
            s.scalars(select(Event).where(Event.alert.is_(True), Event.code == "rpo-threshold-exceeded"))
        )


def test_rpo_threshold_raises_and_clears_the_alert(tmp_path: Path) -> None:
    cp = open_control_plane(load_server_config(tmp_path))
    t0 = time.time()
    with cp.db.session() as s:
        s.add(gold_policy(60))
        s.add(
            Component(
                id="ag",
                kind="agent",
                name="onprem/web1",
                last_heartbeat=t0,
                stats=AgentStats(
                    pairs=[PairStats(pair_id="p1", state=PairState.PROTECTED, captured_seq=10)]
                ).model_dump(mode="json"),
            )
        )
        s.add(
            Component(
                id="mt",
                kind="master-target",
                name="mt-cloud",
                last_heartbeat=t0,
                stats=MasterTargetStats(
                    pairs=[MasterTargetPairStats(pair_id="p1", applied_seq=5, last_applied_time=t0 - 10)]
                ).model_dump(mode="json"),
            )
        )
        s.flush()
        s.add(protected_item())

    def item() -> ReplicatedItem:
        with cp.db.session() as s:
            row = s.get(ReplicatedItem, "it")
            assert row is not None
            return row

    evaluate(cp, now=t0)  # 10 s behind: within 60 s
    assert item().health == "normal" and 9 <= (item().rpo_seconds or 0) <= 11
    assert not _alerts(cp)

    evaluate(cp, now=t0 + 100)  # 110 s: over the threshold
    assert item().health == "warning"
    assert [(a.severity, a.active) for a in _alerts(cp)] == [("warning", True)]

    evaluate(cp, now=t0 + 200)  # 210 s: over twice the threshold, the same alert escalates
    assert item().health == "critical"
    assert [(a.severity, a.active) for a in _alerts(cp)] == [("critical", True)]

    with cp.db.session() as s:  # the master target caught up and the agent reported again
        mt, agent = s.get(Component, "mt"), s.get(Component, "ag")
        assert mt is not None and agent is not None
        mt.stats = MasterTargetStats(
            pairs=[MasterTargetPairStats(pair_id="p1", applied_seq=10, last_applied_time=t0 + 199)]
        ).model_dump(mode="json")
        agent.last_heartbeat = t0 + 200
    evaluate(cp, now=t0 + 200.5)
    assert item().health == "normal" and (item().rpo_seconds or 0) < 1
    assert [a.active for a in _alerts(cp)] == [False]


def test_rpo_shows_lag_while_the_master_target_keeps_applying() -> None:
    """A master target that applies steadily but behind: RPO is the age of the newest applied
    capture, not the time since its last apply (which would always look fresh)."""
    from siterecovery.dr.monitor import CaptureHistory

    history = CaptureHistory()
    t0 = 1_000_000.0
    for second in range(0, 61, 10):  # the agent captures 100 writes every 10 s
        history.record("p1", t0 + second, 100 * (second // 10 + 1))
    # At t0+60 the master target has applied up to 300 — what the agent had at t0+20 — and did so
    # just now: the newest write durable on the recovery side was captured 40 s ago.
    assert history.covered_at("p1", 300) == t0 + 20
    assert history.covered_at("p1", 99) is None
    assert history.covered_at("p1", 700) == t0 + 60
