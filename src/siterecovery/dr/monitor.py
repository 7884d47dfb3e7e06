"""RPO and protection health, evaluated continuously in the configuration server (POL-2, RPW-5).

RPO of an item is the age of the newest write that is durable on the recovery side: when the
master target has applied everything the agent captured (as of the agent's last report), the
item is as fresh as that report; otherwise it is as old as the last write the master target
applied. Above the policy's RPO threshold the item turns warning (critical above twice it) and an
alert opens; both clear when RPO recovers.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from siterecovery.control.context import ControlPlane
from siterecovery.control.db import Component, Policy, ReplicatedItem
from siterecovery.control.events import clear_alert, raise_alert
from siterecovery.control.states import ComponentKind, Direction, Health, ProtectionState, Severity
from siterecovery.dataplane.assignments import AgentStats, MasterTargetStats
from siterecovery.dr.bookmarks import schedule_bookmarks
from siterecovery.dr.desired import agent_name
from siterecovery.dr.record import ItemRecord

log = logging.getLogger("siterecovery.monitor")
INTERVAL = 1.0
DISCOVERY_EVERY = 10  # passes between rediscoveries of the fabrics


@dataclass(frozen=True)
class Rpo:
    item: str
    seconds: float
    caught_up: bool


def item_rpo(s: Session, item: ReplicatedItem, now: float) -> Rpo | None:
    rec = ItemRecord.model_validate(item.details)
    rep = rec.replication
    if rep is None or item.state != ProtectionState.PROTECTED.value:
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
    captured = {p.pair_id: p for p in AgentStats.model_validate(agent.stats or {}).pairs}
    applied = {p.pair_id: p for p in MasterTargetStats.model_validate(mt.stats or {}).pairs}
    caught_up = all(
        p.pair_id in applied
        and p.pair_id in captured
        and applied[p.pair_id].applied_seq >= captured[p.pair_id].captured_seq
        for p in rep.pairs
    )
    if caught_up:
        return Rpo(item.id, max(0.0, now - agent.last_heartbeat), True)
    times = [applied[p.pair_id].last_applied_time for p in rep.pairs if p.pair_id in applied]
    oldest = min((t for t in times if t is not None), default=item.updated_at)
    return Rpo(item.id, max(0.0, now - oldest), False)


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
            health = _health(rpo.seconds, threshold)
            item.rpo_seconds = round(rpo.seconds, 2)
            item.health = health.value
            if health is Health.NORMAL:
                clear_alert(s, "rpo-threshold-exceeded", "replicatedItem", item.id)
            else:
                raise_alert(
                    s,
                    Severity.CRITICAL if health is Health.CRITICAL else Severity.WARNING,
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
