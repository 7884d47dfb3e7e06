"""Desired state of agents and master targets, derived from the replicated items.

A component's desired state is never stored on its own: on every heartbeat it is computed from
the items whose current replication names it, so there is one source of truth and a workflow
changes replication by changing an item. The items are found through the items-by-component
index (`store.item_index`), so a heartbeat reads O(its own items), not every item; its
`version` (a digest of the JSON) lets the heartbeat skip sending a desired state the component
already holds.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from siterecovery.dataplane.assignments import (
    AgentDesired,
    AttachedDisk,
    BookmarkRequest,
    DiskReplication,
    MasterTargetDesired,
    PointCopy,
    ProcessServerDesired,
    RelayAssignment,
)
from siterecovery.store.certificates import revoked_serials
from siterecovery.store.item_index import agent_key
from siterecovery.store.models import Component, ItemComponent, Policy, ReplicatedItem
from siterecovery.store.record import ItemRecord, Replication
from siterecovery.store.states import ComponentKind

DEFAULT_RETENTION_SECONDS = 24 * 3600.0
DEFAULT_CRASH_INTERVAL = 5.0


def agent_name(site: str, machine: str) -> str:
    """Agents are named by site and machine: a failed-over machine keeps its name in the cloud."""
    return f"{site}/{machine}"


def _own_items(s: Session, key: str) -> Iterator[tuple[ReplicatedItem, ItemRecord]]:
    """The items the index lists for component `key`, with their records (in a stable order)."""
    rows = s.scalars(
        select(ReplicatedItem)
        .join(ItemComponent, ItemComponent.item_id == ReplicatedItem.id)
        .where(ItemComponent.component == key)
        .order_by(ReplicatedItem.id)
    )
    for item in rows:
        yield item, ItemRecord.model_validate(item.details)


def _replicating(s: Session, key: str) -> Iterator[tuple[ReplicatedItem, ItemRecord, Replication]]:
    for item, rec in _own_items(s, key):
        if rec.replication is not None:
            yield item, rec, rec.replication


def _held_or_current(rec: ItemRecord) -> Replication | None:
    """What a master target holds for an item: its replication, or a failover changing its point."""
    if rec.replication is not None:
        return rec.replication
    return rec.held.replication if rec.held is not None and rec.held.attached else None


def _policy(s: Session, item: ReplicatedItem) -> Policy | None:
    return s.get(Policy, item.policy_id)


def _address(s: Session, component_id: str) -> str:
    row = s.get(Component, component_id)
    return row.address if row is not None else ""


def _agent_id(s: Session, name: str) -> str:
    found = s.scalar(
        select(Component.id).where(Component.kind == ComponentKind.AGENT.value, Component.name == name)
    )
    return found or ""


def agent_desired(s: Session, agent: Component) -> AgentDesired:
    replications = []
    bookmarks: list[BookmarkRequest] = []
    crash_interval = DEFAULT_CRASH_INTERVAL
    for item, rec, rep in _replicating(s, agent_key(agent.name)):
        if agent_name(rep.source_site.value, rep.source_machine) != agent.name:
            continue
        ps, mt = _address(s, rep.process_server), _address(s, rep.master_target)
        replications += [
            DiskReplication(
                pair_id=p.pair_id,
                disk=p.disk,
                image=Path(p.source),
                process_server=ps,
                master_target=mt,
                process_server_id=rep.process_server,
                sync_mode=rep.sync_mode,
                generation=rep.generation,
            )
            for p in rep.pairs
        ]
        bookmarks += [BookmarkRequest(tag=b.tag, kind=b.kind, freeze=b.freeze) for b in rec.bookmarks]
        policy = _policy(s, item)
        if policy is not None:
            crash_interval = min(crash_interval, float(policy.crash_consistent_frequency_seconds))
    return AgentDesired(
        replications=replications,
        bookmarks=bookmarks,
        crash_interval_seconds=crash_interval,
        revoked=revoked_serials(s),
    )


def master_target_desired(s: Session, mt: Component) -> MasterTargetDesired:
    disks = []
    copies = []
    retention = ""
    window = 0.0
    discard: list[str] = []
    for item, rec in _own_items(s, mt.id):
        discard += [e.pair_id for e in rec.ended_pairs if e.master_target == mt.id]
        rep = _held_or_current(rec)
        if rep is None or rep.master_target != mt.id:
            continue
        retention = retention or rep.retention_volume
        disks += [
            AttachedDisk(
                pair_id=p.pair_id,
                path=Path(p.target),
                size=p.size,
                point=rep.points.get(p.pair_id),
                frozen=rep is not rec.replication,
                process_server=rep.process_server,
            )
            for p in rep.pairs
        ]
        if rec.test is not None:
            copies += [
                PointCopy(
                    request_id=c.request_id, pair_id=c.pair_id, point=c.point, out_path=Path(c.out_path)
                )
                for c in rec.test.copies
            ]
        policy = _policy(s, item)
        window = max(
            window, float(policy.retention_seconds) if policy is not None else DEFAULT_RETENTION_SECONDS
        )
    return MasterTargetDesired(
        disks=disks,
        retention_volume=Path(retention) if retention else None,
        retention_seconds=window or DEFAULT_RETENTION_SECONDS,
        copies=copies,
        refresh=int(mt.desired.get("refresh", 0)),
        discard=discard,
        revoked=revoked_serials(s),
    )


def process_server_desired(s: Session, ps: Component) -> ProcessServerDesired:
    discard = [
        e.pair_id for _, rec in _own_items(s, ps.id) for e in rec.ended_pairs if e.process_server == ps.id
    ]
    # The pairs it relays: each only from the agent of its source, only to its master target.
    pairs = [
        RelayAssignment(
            pair_id=p.pair_id,
            agent=_agent_id(s, agent_name(rep.source_site.value, rep.source_machine)),
            master_target=_address(s, rep.master_target),
            master_target_id=rep.master_target,
            size=p.size,
        )
        for _item, _rec, rep in _replicating(s, ps.id)
        if rep.process_server == ps.id
        for p in rep.pairs
    ]
    return ProcessServerDesired(pairs=pairs, discard=discard, revoked=revoked_serials(s))


def desired_for(s: Session, component: Component) -> dict[str, Any]:
    """The JSON desired state a heartbeat returns to this component."""
    if component.kind == ComponentKind.AGENT.value:
        return agent_desired(s, component).model_dump(mode="json")
    if component.kind == ComponentKind.MASTER_TARGET.value:
        return master_target_desired(s, component).model_dump(mode="json")
    if component.kind == ComponentKind.PROCESS.value:
        return process_server_desired(s, component).model_dump(mode="json")
    return dict(component.desired)


def version_of(desired: dict[str, Any]) -> str:
    """A digest of a desired state: equal versions mean the component already holds it."""
    canonical = json.dumps(desired, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:24]
