"""RPO and protection health, evaluated continuously in the configuration server (POL-2, RPW-5).

RPO of an item is the age of the newest write that is durable on the recovery side: when the
master target has applied everything the agent captured (as of the agent's last report), the
item is as fresh as that report; otherwise it is as old as the newest agent report whose captured
writes the master target has all applied (`CaptureHistory`). Above the policy's RPO threshold
the item turns warning (critical above twice it) and an alert opens; both clear when RPO recovers.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from siterecovery.control.context import ControlPlane
from siterecovery.control.db import Component, Policy, ReplicatedItem
from siterecovery.control.events import clear_alert, raise_alert
from siterecovery.control.states import ComponentKind, Direction, Health, ProtectionState, Severity
from siterecovery.dr.bookmarks import schedule_bookmarks
from siterecovery.dr.desired import agent_name
from siterecovery.dr.heal import check_refused_frames, check_unusable_points
from siterecovery.dr.record import ItemRecord
from siterecovery.dr.stall import check_stalls, worse

log = logging.getLogger("siterecovery.monitor")
INTERVAL = 1.0
DISCOVERY_EVERY = 10  # passes between rediscoveries of the fabrics


@dataclass(frozen=True)
class Rpo:
    item: str
    seconds: float
    caught_up: bool


class CaptureHistory:
    """Per pair, when the agent reported which sequence number it had captured (newest last).

    RPO is the age of the newest write durable on the recovery side. The master target reports the
    sequence it applied, not when that write was captured; this history turns "applied up to n" into
    "everything captured up to the report at time t", so lag shows even while applying goes on.
    """

    def __init__(self, keep_seconds: float = 3600.0) -> None:
        self.keep_seconds = keep_seconds
        self._pairs: dict[str, deque[tuple[float, int]]] = {}

    def record(self, pair_id: str, reported_at: float, captured_seq: int) -> None:
        entries = self._pairs.setdefault(pair_id, deque())
        if not entries or reported_at > entries[-1][0]:
            entries.append((reported_at, captured_seq))
        while entries and entries[0][0] < reported_at - self.keep_seconds:
            entries.popleft()

    def covered_at(self, pair_id: str, applied_seq: int) -> float | None:
        """The time of the newest report whose captured writes are all applied."""
        return next((t for t, seq in reversed(self._pairs.get(pair_id, ())) if seq <= applied_seq), None)


_HISTORY = CaptureHistory()


def _pairs(stats: dict[str, Any]) -> dict[str, dict[str, Any]]:
    # Raw dicts on purpose: this runs every second for every item, and a master target's report
    # carries every retained recovery point, which full validation would parse each time.
    return {str(p.get("pair_id")): p for p in stats.get("pairs", []) or [] if isinstance(p, dict)}


def item_rpo(s: Session, item: ReplicatedItem, now: float, history: CaptureHistory = _HISTORY) -> Rpo | None:
    if item.state != ProtectionState.PROTECTED.value:
        return None
    rep = ItemRecord.model_validate(item.details).replication
    if rep is None:
        return None
    agent = s.scalar(
        select(Component).where(
            Component.kind == ComponentKind.AGENT.value,
            Component.name == agent_name(rep.source_site.value, rep.source_machine),
        )
    )
    mt = s.get(Component, rep.master_target)
    if agent is None or mt is None or agent.last_heartbeat is None:
        return None
    captured, applied = _pairs(agent.stats or {}), _pairs(mt.stats or {})
    worst, caught_up = 0.0, True
    for pair in rep.pairs:
        c, a = captured.get(pair.pair_id), applied.get(pair.pair_id)
        if c is None or a is None:
            return Rpo(item.id, max(0.0, now - item.updated_at), False)
        captured_seq, applied_seq = int(c.get("captured_seq", -1)), int(a.get("applied_seq", -1))
        history.record(pair.pair_id, agent.last_heartbeat, captured_seq)
        if applied_seq >= captured_seq:
            age = now - agent.last_heartbeat
        else:
            caught_up = False
            covered = history.covered_at(pair.pair_id, applied_seq)
            fallback = a.get("last_applied_time") or item.updated_at
            age = now - (covered if covered is not None else float(fallback))
        worst = max(worst, age)
    return Rpo(item.id, max(0.0, worst), caught_up)


def _health(rpo: float, threshold: float) -> Health:
    if rpo > 2 * threshold:
        return Health.CRITICAL
    return Health.WARNING if rpo > threshold else Health.NORMAL


def evaluate(cp: ControlPlane, now: float | None = None) -> list[Rpo]:
    """One pass over every protected item: RPO, health, alerts."""
    now = now or time.time()
    out = []
    with cp.db.session() as s:
        for item in s.scalars(select(ReplicatedItem)):
            rpo = item_rpo(s, item, now)
            if rpo is None:
                continue
            out.append(rpo)
            policy = s.get(Policy, item.policy_id)
            threshold = float(policy.rpo_threshold_seconds) if policy else 900.0
            rpo_health = _health(rpo.seconds, threshold)
            health = worse(rpo_health, check_stalls(s, item, now))  # a pair applying nothing (stall.py)
            health = worse(health, check_refused_frames(s, item))  # damaged frames healing (heal.py)
            health = worse(health, check_unusable_points(s, item))
            item.rpo_seconds = round(rpo.seconds, 2)
            item.health = health.value
            if rpo_health is Health.NORMAL:
                clear_alert(s, "rpo-threshold-exceeded", "replicatedItem", item.id)
            else:
                raise_alert(
                    s,
                    Severity.CRITICAL if rpo_health is Health.CRITICAL else Severity.WARNING,
                    "rpo-threshold-exceeded",
                    f"Item {item.name}: RPO {rpo.seconds:.0f} s exceeds the policy's threshold "
                    f"of {threshold:.0f} s.",
                    "replicatedItem",
                    item.id,
                )
        _watch_powered_on_targets(cp, s)
        schedule_bookmarks(s, now)
    return out


def _watch_powered_on_targets(cp: ControlPlane, s: Session) -> None:
    """RPW-5: an on-premises machine written by a master target must stay off; alert if it runs."""
    from siterecovery.dr.guest import powered_on

    for item in s.scalars(
        select(ReplicatedItem).where(
            ReplicatedItem.direction == Direction.FAILBACK.value,
            ReplicatedItem.state == ProtectionState.PROTECTED.value,
        )
    ):
        rec = ItemRecord.model_validate(item.details)
        if powered_on(cp, rec.onprem_fabric, rec.machine):
            raise_alert(
                s,
                Severity.CRITICAL,
                "protected-machine-powered-on",
                f"On-premises machine {rec.machine} was powered on while the master target writes its disks.",
                "replicatedItem",
                item.id,
            )
        else:
            clear_alert(s, "protected-machine-powered-on", "replicatedItem", item.id)


class Monitor:
    """The background thread of the configuration server that runs `evaluate` every second."""

    def __init__(self, cp: ControlPlane, interval: float = INTERVAL) -> None:
        self.cp = cp
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rpo-monitor", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        passes = 0
        while not self._stop.wait(self.interval):
            try:
                if passes % DISCOVERY_EVERY == 0:
                    refresh_fabrics(self.cp)
                evaluate(self.cp)
            except Exception:  # the monitor must outlive a bad pass (e.g. a fabric that is down)
                log.exception("monitor pass failed")
            passes += 1


def refresh_fabrics(cp: ControlPlane) -> None:
    """Rediscover every fabric, so power-state watches and the portal see recent inventory."""
    from siterecovery.control.db import Fabric as FabricRow
    from siterecovery.control.fabric_access import discover
    from siterecovery.errors import SiteRecoveryError

    with cp.db.session() as s:
        for row in s.scalars(select(FabricRow)):
            try:
                discover(cp, row)
            except SiteRecoveryError:
                continue  # recorded on the row as its discovery error
