"""Desired state of agents and master targets, derived from the replicated items.

A component's desired state is never stored on its own: on every heartbeat it is computed from
the items whose current replication names it, so there is one source of truth and a workflow
changes replication by changing an item. The items are found through the items-by-component
index (`store.item_index`), so a heartbeat reads O(its own items), not every item; its
`version` (a digest of the JSON) lets the heartbeat skip sending a desired state the component
already holds. Each process keeps the desired state it last computed per component with the
desired epoch it read before computing it (`store.desired_epoch`): while the database's epoch is
unchanged, an idle heartbeat reuses it without reading anything.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from sqlalchemy import select
from sqlalchemy.orm import Session, load_only

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


# Item id -> (details_rev, its parsed record): a heartbeat validates only the records that changed
# since this process last parsed them (`details_rev` is bumped with every change of `details`,
# `store.item_index`). Parsing was most of a master target's or process server's heartbeat
# (one record per item it serves). Records are only read here, never changed.
_RECORDS: dict[str, tuple[int, ItemRecord]] = {}
_RECORDS_LOCK = threading.Lock()
_RECORDS_MAX = 100_000  # items; beyond that the cache starts again (deleted items leave entries)


def records(s: Session, revs: Iterable[tuple[str, int]]) -> dict[str, ItemRecord]:
    """The parsed records of these (item id, details_rev), from this process's cache when current.

    An item deleted since its id was read is missing from the answer."""
    revs = list(revs)
    with _RECORDS_LOCK:
        found = {i: _RECORDS[i][1] for i, rev in revs if _RECORDS.get(i, (None,))[0] == rev}
    stale = [i for i, _ in revs if i not in found]
    for start in range(0, len(stale), 1000):  # a bounded IN list (a cold process reads them all)
        parsed: dict[str, tuple[int, ItemRecord]] = {
            item_id: (rev, ItemRecord.model_validate(details))
            for item_id, rev, details in cast(
                Iterable[tuple[str, int, dict[str, Any]]],
                s.execute(
                    select(ReplicatedItem.id, ReplicatedItem.details_rev, ReplicatedItem.details).where(
                        ReplicatedItem.id.in_(stale[start : start + 1000])
                    )
                ),
            )
        }
        with _RECORDS_LOCK:
            if len(_RECORDS) > _RECORDS_MAX:
                _RECORDS.clear()
            _RECORDS.update(parsed)
        found.update({i: rec for i, (_, rec) in parsed.items()})
    return found


# An item as a desired state reads it: its policy's id and its record.
Own = tuple[str | None, ItemRecord]


def _own_items(s: Session, key: str) -> list[Own]:
    """The items the index lists for component `key`, with their records (in a stable order)."""
    rows = list(
        s.scalars(
            select(ReplicatedItem)
            .options(load_only(ReplicatedItem.id, ReplicatedItem.details_rev, ReplicatedItem.policy_id))
            .join(ItemComponent, ItemComponent.item_id == ReplicatedItem.id)
            .where(ItemComponent.component == key)
            .order_by(ReplicatedItem.id)
        )
    )
    found = records(s, ((r.id, r.details_rev) for r in rows))
    return [(r.policy_id, found[r.id]) for r in rows if r.id in found]  # else deleted meanwhile


def _held_or_current(rec: ItemRecord) -> Replication | None:
    """What a master target holds for an item: its replication, or a failover changing its point."""
    if rec.replication is not None:
        return rec.replication
    return rec.held.replication if rec.held is not None and rec.held.attached else None


class Lookups:
    """Columns of other rows one desired state names, each read once per heartbeat.

    Only the columns needed: loading a whole component row would decode its statistics JSON
    (a master target's lists every recovery point of every pair), and the session's identity map
    holds rows weakly, so a row dropped after one use would be read (and decoded) again for the
    next pair. This was most of a process server's heartbeat (one row per pair it relays).
    A bulk build (`dr.desired_bulk`) gives every row up front (`preloaded`): nothing is read then.
    """

    def __init__(self, s: Session | None) -> None:
        self.s = s
        self._addresses: dict[str, str] = {}
        self._windows: dict[str | None, tuple[float, float] | None] = {}
        self._agents: dict[str, str] | None = None  # every agent's id by name, when preloaded

    @classmethod
    def preloaded(
        cls, addresses: dict[str, str], windows: dict[str, tuple[float, float]], agents: dict[str, str]
    ) -> Lookups:
        """Every component's address, every policy's window and every agent's id, given."""
        look = cls(None)
        look._addresses, look._agents = addresses, agents
        look._windows = {None: None}
        look._windows.update(windows)
        return look

    def addresses(self, ids: Iterable[str]) -> None:
        wanted = {i for i in ids if i not in self._addresses}
        if wanted and self.s is not None:
            rows = self.s.execute(select(Component.id, Component.address).where(Component.id.in_(wanted)))
            self._addresses.update({i: "" for i in wanted})
            self._addresses.update({i: a for i, a in rows})

    def address(self, component_id: str) -> str:
        self.addresses([component_id])
        return self._addresses.get(component_id, "")

    def policy(self, policy_id: str | None) -> tuple[float, float] | None:
        """(crash point interval, retention seconds) of a policy, None when there is none."""
        if policy_id not in self._windows:
            row = (
                None
                if self.s is None
                else self.s.execute(
                    select(Policy.crash_consistent_frequency_seconds, Policy.retention_seconds).where(
                        Policy.id == policy_id
                    )
                ).first()
            )
            self._windows[policy_id] = None if row is None else (float(row[0]), float(row[1]))
        return self._windows[policy_id]

    def agent_ids(self, names: Iterable[str]) -> dict[str, str]:
        wanted = set(names)
        if self._agents is not None:
            return {n: self._agents[n] for n in wanted if n in self._agents}
        if not wanted or self.s is None:
            return {}
        rows = self.s.execute(
            select(Component.name, Component.id).where(
                Component.kind == ComponentKind.AGENT, Component.name.in_(wanted)
            )
        )
        return {n: i for n, i in rows}


def agent_desired(s: Session, agent: Component) -> AgentDesired:
    own = _own_items(s, agent_key(agent.name))
    return build_agent(agent.name, own, Lookups(s), revoked_serials(s))


def build_agent(name: str, items: list[Own], look: Lookups, revoked: list[str]) -> AgentDesired:
    """An agent's desired state from its items (`_own_items`), however they were read."""
    replications = []
    bookmarks: list[BookmarkRequest] = []
    crash_interval = DEFAULT_CRASH_INTERVAL
    own = [
        (policy_id, rec, rec.replication)
        for policy_id, rec in items
        if rec.replication is not None
        and agent_name(rec.replication.source_site.value, rec.replication.source_machine) == name
    ]
    # Every process server's and master target's address in one statement, not two per item.
    look.addresses(i for _, _, rep in own for i in (rep.process_server, rep.master_target))
    for policy_id, rec, rep in own:
        ps, mt = look.address(rep.process_server), look.address(rep.master_target)
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
        policy = look.policy(policy_id)
        if policy is not None:
            crash_interval = min(crash_interval, policy[0])
    return AgentDesired(
        replications=replications,
        bookmarks=bookmarks,
        crash_interval_seconds=crash_interval,
        revoked=revoked,
    )


def master_target_desired(s: Session, mt: Component) -> MasterTargetDesired:
    refresh = int(mt.desired.get("refresh", 0))
    return build_master_target(mt.id, refresh, _own_items(s, mt.id), Lookups(s), revoked_serials(s))


def build_master_target(
    mt_id: str, refresh: int, items: list[Own], look: Lookups, revoked: list[str]
) -> MasterTargetDesired:
    """A master target's desired state from its items (`_own_items`), however they were read."""
    disks = []
    copies = []
    retention = ""
    window = 0.0
    discard: list[str] = []
    for policy_id, rec in items:
        discard += [e.pair_id for e in rec.ended_pairs if e.master_target == mt_id]
        rep = _held_or_current(rec)
        if rep is None or rep.master_target != mt_id:
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
        policy = look.policy(policy_id)
        window = max(window, policy[1] if policy is not None else DEFAULT_RETENTION_SECONDS)
    return MasterTargetDesired(
        disks=disks,
        retention_volume=Path(retention) if retention else None,
        retention_seconds=window or DEFAULT_RETENTION_SECONDS,
        copies=copies,
        refresh=refresh,
        discard=discard,
        revoked=revoked,
    )


def process_server_desired(s: Session, ps: Component) -> ProcessServerDesired:
    return build_process_server(ps.id, _own_items(s, ps.id), Lookups(s), revoked_serials(s))


def build_process_server(
    ps_id: str, items: list[Own], look: Lookups, revoked: list[str]
) -> ProcessServerDesired:
    """A process server's desired state from its items (`_own_items`), however they were read."""
    discard = [e.pair_id for _, rec in items for e in rec.ended_pairs if e.process_server == ps_id]
    relayed = [
        rec.replication
        for _, rec in items
        if rec.replication is not None and rec.replication.process_server == ps_id
    ]
    # The pairs it relays: each only from the agent of its source, only to its master target.
    agents = look.agent_ids(agent_name(rep.source_site.value, rep.source_machine) for rep in relayed)
    look.addresses(rep.master_target for rep in relayed)
    pairs = [
        RelayAssignment(
            pair_id=p.pair_id,
            agent=agents.get(agent_name(rep.source_site.value, rep.source_machine), ""),
            master_target=look.address(rep.master_target),
            master_target_id=rep.master_target,
            size=p.size,
        )
        for rep in relayed
        for p in rep.pairs
    ]
    return ProcessServerDesired(pairs=pairs, discard=discard, revoked=revoked)


def desired_for(s: Session, component: Component) -> dict[str, Any]:
    """The JSON desired state a heartbeat returns to this component."""
    if component.kind == ComponentKind.AGENT:
        return agent_desired(s, component).model_dump(mode="json")
    if component.kind == ComponentKind.MASTER_TARGET:
        return master_target_desired(s, component).model_dump(mode="json")
    if component.kind == ComponentKind.PROCESS:
        return process_server_desired(s, component).model_dump(mode="json")
    return dict(component.desired)


def version_of(desired: dict[str, Any]) -> str:
    """A digest of a desired state: equal versions mean the component already holds it."""
    canonical = json.dumps(desired, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:24]


@dataclass(frozen=True)
class Desired:
    """A component's desired state and its version."""

    state: dict[str, Any]
    version: str


# (database URL, component id) -> (epoch, until when: monotonic, desired). A state is dropped at
# that time: the one input that changes with time alone is the revoked serials, whose expired
# entries leave the list (an expired certificate fails TLS anyway, so keeping it a minute longer
# is harmless). A single build keeps its state CACHE_SECONDS; a bulk build (`dr.desired_bulk`)
# knows when the first revoked serial it listed expires and keeps its states until then.
_DESIRED: dict[tuple[str, str], tuple[int, float, Desired]] = {}
_DESIRED_LOCK = threading.Lock()
CACHE_SECONDS = 60.0


def cached_desired(db_url: str, component_id: str, epoch: int) -> Desired | None:
    """The desired state computed under this epoch, if this process holds one."""
    with _DESIRED_LOCK:
        found = _DESIRED.get((db_url, component_id))
    if found is None or found[0] != epoch or time.monotonic() > found[1]:
        return None
    return found[2]


def remember_desired(
    db_url: str, component_id: str, epoch: int, state: dict[str, Any], keep: float = CACHE_SECONDS
) -> Desired:
    """Keep a desired state computed after reading `epoch` (read first: see store.desired_epoch)
    for `keep` seconds at most."""
    desired = Desired(state, version_of(state))
    with _DESIRED_LOCK:
        if len(_DESIRED) > _RECORDS_MAX:  # removed components leave entries
            _DESIRED.clear()
        _DESIRED[(db_url, component_id)] = (epoch, time.monotonic() + keep, desired)
    return desired
