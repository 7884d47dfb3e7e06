"""Stall detection: a pair with a backlog whose master target applies nothing turns the item's health.

RPO grows slowly on an item whose policy allows hours; a pair that applies nothing at all is a
different fault (a refused frame, a cut link, a full retention volume, a dead process server) and
must show within a minute. The monitor (`monitor.py`) checks each protected item on every pass
(`pair_stalls`, from the reports its one read decoded; `check_stalls` reads them itself): a
pair whose master target has applied nothing for `warning` seconds while the agent had
captured more turns the item warning, after `critical` seconds critical, with one
`replication-stalled` alert per item naming the pair and the hop that does not move. Both clear
when the pair applies again. Thresholds come from the environment (SITERECOVERY_STALL_WARNING_SECONDS,
SITERECOVERY_STALL_CRITICAL_SECONDS; 60 s and 300 s by default), read on every pass.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from siterecovery.dr.desired import agent_name
from siterecovery.store.events import clear_alert, raise_alert
from siterecovery.store.models import Component, ReplicatedItem
from siterecovery.store.record import ItemRecord
from siterecovery.store.states import ComponentKind, Health, ProtectionState, Severity

ALERT = "replication-stalled"


class Hop(StrEnum):
    AGENT_TO_PS = "agent -> process server"
    PS_TO_MT = "process server -> master target"
    MT_APPLY = "master target apply"


@dataclass(frozen=True)
class Thresholds:
    warning: float = 60.0
    critical: float = 300.0

    @classmethod
    def from_env(cls) -> Thresholds:
        return cls(
            float(os.environ.get("SITERECOVERY_STALL_WARNING_SECONDS", "60")),
            float(os.environ.get("SITERECOVERY_STALL_CRITICAL_SECONDS", "300")),
        )

    def health(self, seconds: float) -> Health:
        if seconds >= self.critical:
            return Health.CRITICAL
        return Health.WARNING if seconds >= self.warning else Health.NORMAL


@dataclass(frozen=True)
class Stall:
    pair_id: str
    hop: Hop
    seconds: float
    health: Health
    detail: str = ""


class StallWatch:
    """Per pair: the applied sequence last seen and since when it has not moved under a backlog."""

    def __init__(self) -> None:
        # pair -> (applied sequence, since when a backlog waits on it; None: no backlog)
        self._pairs: dict[str, tuple[int, float | None]] = {}

    def stalled_for(self, pair_id: str, captured: int, applied: int, now: float) -> float:
        seen = self._pairs.get(pair_id)
        if captured <= applied:
            # No backlog: no clock runs. (Not "since now": the monitor looks at a pair only when
            # its reports change or a threshold comes, so the last look may be long ago.)
            self._pairs[pair_id] = (applied, None)
            return 0.0
        if seen is None or applied != seen[0] or seen[1] is None:
            # A backlog first seen, or progress: the clock starts from now.
            self._pairs[pair_id] = (applied, now)
            return 0.0
        return now - seen[1]

    def since(self, pair_id: str) -> float | None:
        """Since when the pair's backlog has waited with nothing applied (None: no backlog)."""
        seen = self._pairs.get(pair_id)
        return None if seen is None else seen[1]

    def clear(self) -> None:
        self._pairs.clear()


WATCH = StallWatch()


def _pairs(stats: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {str(p.get("pair_id")): p for p in stats.get("pairs", []) or [] if isinstance(p, dict)}


def _hop(captured: int, acked: int, applied: int, paused: str) -> tuple[Hop, str]:
    if paused:
        return Hop.MT_APPLY, f"paused: {paused}"
    if acked > applied:
        return Hop.PS_TO_MT, f"{acked - applied} acknowledged write(s) not applied"
    return Hop.AGENT_TO_PS, f"{captured - acked} captured write(s) not acknowledged"


def item_stalls(s: Session, item: ReplicatedItem, now: float, watch: StallWatch = WATCH) -> list[Stall]:
    """The item's stalled pairs (none unless it is protected and its components reported)."""
    if item.state != ProtectionState.PROTECTED:
        return []
    rep = ItemRecord.model_validate(item.details).replication
    if rep is None or rep.points:
        return []  # not replicating, or held at a chosen point for a failover: nothing is applied
    agent = s.scalar(
        select(Component).where(
            Component.kind == ComponentKind.AGENT,
            Component.name == agent_name(rep.source_site.value, rep.source_machine),
        )
    )
    mt = s.get(Component, rep.master_target)
    if agent is None or mt is None:
        return []
    return pair_stalls([p.pair_id for p in rep.pairs], agent.stats or {}, mt.stats or {}, now, watch)


def pair_stalls(
    pairs: Iterable[str],
    agent_stats: dict[str, Any],
    mt_stats: dict[str, Any],
    now: float,
    watch: StallWatch = WATCH,
) -> list[Stall]:
    """The stalled ones of an item's pairs, from its agent's and master target's reports."""
    return indexed_stalls(pairs, _pairs(agent_stats), _pairs(mt_stats), now, watch)


def indexed_stalls(
    pairs: Iterable[str],
    captured_by: Mapping[str, dict[str, Any]],
    applied_by: Mapping[str, dict[str, Any]],
    now: float,
    watch: StallWatch = WATCH,
    thresholds: Thresholds | None = None,
) -> list[Stall]:
    """`pair_stalls` from the reports' pairs by pair id (the RPO monitor indexes each report once
    per change, not once per item: a master target's lists every pair it applies; it reads the
    thresholds once per pass too)."""
    thresholds = thresholds or Thresholds.from_env()
    out = []
    for pair_id in pairs:
        c, a = captured_by.get(pair_id), applied_by.get(pair_id)
        if c is None or a is None:
            continue
        captured, acked = int(c.get("captured_seq", -1)), int(c.get("acked_seq", -1))
        applied = int(a.get("applied_seq", -1))
        seconds = watch.stalled_for(pair_id, captured, applied, now)
        health = thresholds.health(seconds)
        if health is not Health.NORMAL:
            hop, detail = _hop(captured, acked, applied, str(a.get("paused") or ""))
            out.append(Stall(pair_id, hop, seconds, health, detail))
    return out


def check_stalls(s: Session, item: ReplicatedItem, now: float, watch: StallWatch = WATCH) -> Health:
    """Raise, escalate or clear the item's stall alert; returns the health the stalls imply."""
    return alert_stalls(s, item.id, item.name, item_stalls(s, item, now, watch))


def alert_stalls(
    s: Session, item_id: str, item_name: str, stalls: list[Stall], active: bool = True
) -> Health:
    """The stall alert for `stalls`; `active` False says none is open (nothing to clear)."""
    if not stalls:
        if active:
            clear_alert(s, ALERT, "replicatedItem", item_id)
        return Health.NORMAL
    worst = max(stalls, key=lambda st: (st.health is Health.CRITICAL, st.seconds))
    raise_alert(
        s,
        Severity.CRITICAL if worst.health is Health.CRITICAL else Severity.WARNING,
        ALERT,
        f"Item {item_name}: pair {worst.pair_id} applied nothing for {worst.seconds:.0f} s; "
        f"stalled at hop {worst.hop.value} ({worst.detail}).",
        "replicatedItem",
        item_id,
    )
    return worst.health


_RANK = {Health.NORMAL: 0, Health.WARNING: 1, Health.CRITICAL: 2}


def worse(a: Health, b: Health) -> Health:
    return a if _RANK[a] >= _RANK[b] else b
