"""What the portal's pages show, built from the API's own view functions.

Rows for the replicated-items table (RPO coloured against the policy's threshold, the latest
recovery point, the actions valid in the item's state), the overview's counts, and the
infrastructure page's process servers, master targets and retention volumes.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from siterecovery.config import ServerConfig
from siterecovery.control.api.events import event_view, find_events
from siterecovery.control.api.items import ItemOut, item_view
from siterecovery.control.api.jobs import job_view
from siterecovery.control.heartbeats import server_view
from siterecovery.control.reports import entries, number
from siterecovery.control.schemas import EventOut, JobOut, ServerOut
from siterecovery.dr.recovery_points import item_points
from siterecovery.dr.rules import MAX_MT_DISKS
from siterecovery.store.models import Component, Job, Policy, ReplicatedItem
from siterecovery.store.record import ItemRecord
from siterecovery.store.states import ComponentKind, Direction, Health, JobState, ProtectionState
from siterecovery.store.tokens import Principal


class ItemAction(StrEnum):
    """Row actions; the value is the portal route's last path segment."""

    FAILOVER = "failover"
    TEST_FAILOVER = "test-failover"
    TEST_CLEANUP = "test-cleanup"
    CHANGE_POINT = "change-point"
    COMMIT = "commit"
    REPROTECT = "reprotect"
    FAILBACK = "failback"
    DISABLE = "disable"

    @property
    def caption(self) -> str:
        return _CAPTIONS.get(self, self.value.capitalize())


_CAPTIONS = {
    ItemAction.REPROTECT: "Re-Protect",
    ItemAction.TEST_FAILOVER: "Test failover",
    ItemAction.TEST_CLEANUP: "Cleanup test failover",
    ItemAction.CHANGE_POINT: "Change recovery point",
}


# States in which a job is already working on the item: starting another action is not offered.
_BUSY = frozenset(
    {
        ProtectionState.ENABLING,
        ProtectionState.INITIAL_SYNC,
        ProtectionState.FAILOVER_IN_PROGRESS,
        ProtectionState.REPROTECTING,
        ProtectionState.DISABLED,
    }
)


def actions_for(
    state: ProtectionState, direction: Direction, has_test: bool = False
) -> tuple[ItemAction, ...]:
    """The actions the API accepts in this state (see dr.operations), in the order ASR lists them.

    `has_test`: a test failover's machine still exists; it must be cleaned up before another.
    """
    if state in _BUSY:
        return ()
    found: list[ItemAction] = []
    if state is ProtectionState.PROTECTED:
        found.append(ItemAction.FAILOVER if direction is Direction.FORWARD else ItemAction.FAILBACK)
        if not has_test:
            found.append(ItemAction.TEST_FAILOVER)
    if has_test:
        found.append(ItemAction.TEST_CLEANUP)
    if state is ProtectionState.FAILED_OVER:
        found += [ItemAction.CHANGE_POINT, ItemAction.COMMIT]
    elif state is ProtectionState.FAILOVER_COMMITTED:
        found.append(ItemAction.REPROTECT)
    found.append(ItemAction.DISABLE)
    return tuple(found)


class RpoLevel(StrEnum):
    OK = "ok"  # within the policy's threshold
    WARNING = "warning"  # over the threshold (POL-2 alert)
    CRITICAL = "critical"  # over twice the threshold
    UNKNOWN = "unknown"  # not measured (not replicating)


def rpo_level(rpo_seconds: float | None, threshold_seconds: float) -> RpoLevel:
    if rpo_seconds is None:
        return RpoLevel.UNKNOWN
    if rpo_seconds <= threshold_seconds:
        return RpoLevel.OK
    return RpoLevel.WARNING if rpo_seconds <= 2 * threshold_seconds else RpoLevel.CRITICAL


@dataclass(frozen=True)
class ItemRow:
    item: ItemOut
    policy_name: str
    rpo_threshold_seconds: int
    rpo_level: RpoLevel
    latest_point: float | None  # time of the newest data applied on the recovery side
    process_server: str
    master_target: str
    actions: tuple[ItemAction, ...]


def _latest_point(s: Session, rec: ItemRecord) -> float | None:
    """Time of the newest point every disk of the item has on its master target."""
    if rec.replication is None:
        return None
    points = item_points(s, rec.replication)
    return points[0].time if points else None


PAGE_SIZE = 100  # items per portal page


def item_rows(
    s: Session, after: str | None = None, limit: int | None = None, ids: list[str] | None = None
) -> list[ItemRow]:
    """Rows by name: a page (`after` a name, at most `limit`), or the items `ids`, or all."""
    policies = {p.id: p for p in s.scalars(select(Policy))}
    q = select(ReplicatedItem).order_by(ReplicatedItem.name)
    if after is not None:
        q = q.where(ReplicatedItem.name > after)
    if ids is not None:
        q = q.where(ReplicatedItem.id.in_(ids))
    items = list(s.scalars(q.limit(limit) if limit is not None else q))
    wanted = {i.process_server_id for i in items} | {i.master_target_id for i in items}
    components = {c.id: c for c in s.scalars(select(Component).where(Component.id.in_(wanted - {None})))}
    rows = []
    for item in items:
        policy = policies.get(item.policy_id)
        threshold = policy.rpo_threshold_seconds if policy else 0
        ps = components.get(item.process_server_id or "")
        mt = components.get(item.master_target_id or "")
        rec = ItemRecord.model_validate(item.details)
        rows.append(
            ItemRow(
                item=item_view(item),
                policy_name=policy.name if policy else item.policy_id,
                rpo_threshold_seconds=threshold,
                rpo_level=rpo_level(item.rpo_seconds, threshold),
                latest_point=_latest_point(s, rec),
                process_server=ps.name if ps else "",
                master_target=mt.name if mt else "",
                actions=actions_for(item.state, item.direction, rec.test is not None),
            )
        )
    return rows


@dataclass(frozen=True)
class Overview:
    total: int
    by_state: list[tuple[ProtectionState, int]]
    by_health: list[tuple[Health, int]]
    worst_rpo: list[ItemRow]
    alerts: list[EventOut]
    running_jobs: list[JobOut]


_ACTIVE_JOB_STATES = (JobState.QUEUED, JobState.RUNNING, JobState.PAUSED)


def overview(s: Session, who: Principal) -> Overview:
    # Counted by the database: the overview costs the same at 5,000 items as at 5.
    counts = list(
        s.execute(
            select(ReplicatedItem.state, ReplicatedItem.health, func.count()).group_by(
                ReplicatedItem.state, ReplicatedItem.health
            )
        )
    )
    states: Counter[ProtectionState] = Counter()
    health: Counter[Health] = Counter()
    for state, item_health, n in counts:
        states[state] += n
        health[item_health] += n
    worst_ids = list(
        s.scalars(
            select(ReplicatedItem.id)
            .where(ReplicatedItem.rpo_seconds.is_not(None))
            .order_by(ReplicatedItem.rpo_seconds.desc())
            .limit(5)
        )
    )
    worst = sorted(item_rows(s, ids=worst_ids), key=lambda r: r.item.rpo_seconds or 0.0, reverse=True)
    alerts = [event_view(e) for e in find_events(s, alerts=True, active=True, limit=50)]
    jobs = [
        job_view(s, j)
        for j in s.scalars(select(Job).where(Job.state.in_(_ACTIVE_JOB_STATES)).order_by(Job.created_at))
    ]
    return Overview(
        total=sum(states.values()),
        by_state=sorted(states.items()),
        by_health=[(h, health[h]) for h in Health if h in health],  # best first, not by name
        worst_rpo=worst,
        alerts=alerts,
        running_jobs=jobs,
    )


@dataclass(frozen=True)
class RetentionChoice:
    """A retention volume a master target reported, and whether it may hold recovery points (RP-RET)."""

    name: str
    capacity_bytes: int
    free_bytes: int
    fs_type: str
    eligible: bool
    reason: str


def retention_choices(stats: dict[str, Any]) -> list[RetentionChoice]:
    out = []
    for v in entries(stats, "retention_volumes"):
        capacity = int(number(v, "capacity_bytes"))
        out.append(
            RetentionChoice(
                name=str(v.get("name") or v.get("path")),
                capacity_bytes=capacity,
                free_bytes=int(number(v, "free_bytes")),
                fs_type=str(v.get("fs_type", "")),
                # The same default as the reprotect check: without a verdict, capacity decides.
                eligible=bool(v.get("eligible", capacity > 0)),
                reason=str(v.get("reason", "" if capacity > 0 else "its capacity is 0")),
            )
        )
    return out


@dataclass(frozen=True)
class MasterTargetRow:
    server: ServerOut
    attached_disks: int
    max_disks: int
    retention: list[RetentionChoice]


@dataclass(frozen=True)
class ProcessServerRow:
    server: ServerOut
    cache_used_bytes: int
    cache_capacity_bytes: int
    cache_percent: float
    throughput_bytes_per_s: float


@dataclass(frozen=True)
class Infrastructure:
    configuration: list[ServerOut]
    process_servers: list[ProcessServerRow]
    master_targets: list[MasterTargetRow]
    agents: list[ServerOut]


def master_target_row(server: ServerOut) -> MasterTargetRow:
    return MasterTargetRow(
        server=server,
        attached_disks=int(number(server.stats, "attached_disks")),
        max_disks=MAX_MT_DISKS,
        retention=retention_choices(server.stats),
    )


def process_server_row(server: ServerOut) -> ProcessServerRow:
    used = int(number(server.stats, "cache_used_bytes"))
    capacity = int(number(server.stats, "cache_capacity_bytes"))
    return ProcessServerRow(
        server=server,
        cache_used_bytes=used,
        cache_capacity_bytes=capacity,
        cache_percent=100.0 * used / capacity if capacity else 0.0,
        throughput_bytes_per_s=number(server.stats, "throughput_bytes_per_s"),
    )


def servers(s: Session, config: ServerConfig, kind: ComponentKind) -> list[ServerOut]:
    rows = s.scalars(select(Component).where(Component.kind == kind.value).order_by(Component.name))
    return [server_view(s, r, config) for r in rows]


def infrastructure(s: Session, config: ServerConfig) -> Infrastructure:
    return Infrastructure(
        configuration=servers(s, config, ComponentKind.CONFIGURATION),
        process_servers=[process_server_row(x) for x in servers(s, config, ComponentKind.PROCESS)],
        master_targets=[master_target_row(x) for x in servers(s, config, ComponentKind.MASTER_TARGET)],
        agents=servers(s, config, ComponentKind.AGENT),
    )
