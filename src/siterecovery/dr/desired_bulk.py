"""Every component's desired state in one pass, for a process that meets a desired epoch cold.

A heartbeat reuses the desired state its process computed under the current desired epoch
(`dr.desired`). When the epoch changes — or the process starts, or its cached states age out —
every component's next heartbeat on that process computed its own: a session and five or six
statements each (~4 to 5 ms of server CPU for an idle agent at 5,000 items, more than the rest of
its heartbeat), 5,100 components on each process. Here one pass builds them all: the index rows
of every component with their items, the records not yet parsed, every component's address,
every policy and the revoked serials — a handful of statements — then each component's state
from the same functions the single path uses (`dr.desired.build_*`), so the two cannot differ.

When: on a heartbeat's cache miss, if this process has not built in bulk under that epoch yet (or
its bulk states aged out: they are kept until the first revoked serial they list expires, at most
`KEEP_SECONDS`, where a single build's are kept a minute), and the last bulk build ended long enough ago that
bulk building takes at most a fifth of the process's time (`SPACING`): while the epoch changes
faster than that (a busy rollout), misses are built one by one as before, so a bulk build never
costs more than it saves. Heartbeats missing while a bulk build runs wait for it rather than
build their own (a bulk build started for a burst of new components, `build_for_newcomers`, is waited for
too). Built states are kept under the epoch read in the bulk's own transaction,
before anything else it reads: the same rule as a single build, so a change through another
process is still seen at the next heartbeat.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, cast

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from siterecovery.dr.desired import (
    Desired,
    Lookups,
    Own,
    build_agent,
    build_master_target,
    build_process_server,
    cached_desired,
    records,
    remember_desired,
)
from siterecovery.store import desired_epoch
from siterecovery.store.certificates import revoked_serials
from siterecovery.store.database import Database
from siterecovery.store.item_index import agent_key
from siterecovery.store.models import (
    Component,
    ComponentCertificate,
    ItemComponent,
    Policy,
    ReplicatedItem,
    now,
)
from siterecovery.store.states import ComponentKind

log = logging.getLogger("siterecovery.desired")

# A bulk build starts only when the last one ended at least SPACING times its length ago, and
# once this process has met at least BULK_MIN components cold (below, a few single builds cost
# less than reading every item, and a small deployment's heartbeat keeps reading only its own).
SPACING = 4.0
BULK_MIN = 64
KEEP_SECONDS = 600.0  # a bulk build's states, at most (the revoked serials' expiry may say sooner)
_KINDS = (ComponentKind.AGENT, ComponentKind.PROCESS, ComponentKind.MASTER_TARGET)


def desired_all(s: Session) -> dict[str, dict[str, Any]]:
    """Every agent's, process server's and master target's desired state (JSON), by id:
    what `dr.desired.desired_for` returns for each, read in a handful of statements."""
    index: dict[str, list[tuple[str, int, str | None]]] = defaultdict(list)
    rows = s.execute(
        select(ItemComponent.component, ReplicatedItem.id, ReplicatedItem.details_rev)
        .add_columns(ReplicatedItem.policy_id)
        .join(ItemComponent, ItemComponent.item_id == ReplicatedItem.id)
        .order_by(ItemComponent.component, ReplicatedItem.id)
    )
    for key, item_id, rev, policy in cast(Iterable[tuple[str, str, int, str | None]], rows):
        index[key].append((item_id, rev, policy))
    parsed = records(s, {(i, rev) for rows in index.values() for i, rev, _ in rows})

    def own(key: str) -> list[Own]:
        return [(policy, parsed[i]) for i, _, policy in index.get(key, ()) if i in parsed]

    components = cast(
        list[tuple[str, str, str, str, dict[str, Any] | None]],
        s.execute(
            select(Component.id, Component.kind, Component.name, Component.address, Component.desired)
        ).all(),
    )
    windows = {
        pid: (float(crash), float(retention))
        for pid, crash, retention in s.execute(
            select(Policy.id, Policy.crash_consistent_frequency_seconds, Policy.retention_seconds)
        )
    }
    look = Lookups.preloaded(
        {cid: address for cid, _, _, address, _ in components},
        windows,
        {name: cid for cid, kind, name, _, _ in components if kind == ComponentKind.AGENT},
    )
    revoked = revoked_serials(s)
    out: dict[str, dict[str, Any]] = {}
    for cid, kind, name, _, desired in components:
        if kind == ComponentKind.AGENT:
            state: Any = build_agent(name, own(agent_key(name)), look, revoked)
        elif kind == ComponentKind.MASTER_TARGET:
            refresh = int((desired or {}).get("refresh", 0))
            state = build_master_target(cid, refresh, own(cid), look, revoked)
        elif kind == ComponentKind.PROCESS:
            state = build_process_server(cid, own(cid), look, revoked)
        else:
            continue
        out[cid] = state.model_dump(mode="json")
    return out


@dataclass
class _Bulk:
    """This process's bulk builds for one database."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    epoch: int | None = None  # the epoch the last bulk build read
    started: float = -1e9  # monotonic
    ended: float = -1e9
    length: float = 0.0
    keep: float = 0.0  # seconds its states are kept
    built: int = 0  # states the last one built
    building: bool = False  # one is running (its thread holds `lock`)
    met: set[str] = field(default_factory=set)  # components whose desired state missed here

    def due(self, epoch: int, at: float) -> bool:
        stale = self.epoch != epoch or at - self.started > self.keep
        return stale and len(self.met) >= BULK_MIN and at - self.ended >= SPACING * self.length


_BULKS: dict[str, _Bulk] = {}
_BULKS_LOCK = threading.Lock()


def _bulk(url: str) -> _Bulk:
    with _BULKS_LOCK:
        return _BULKS.setdefault(url, _Bulk())


def cold_desired(db: Database, component_id: str, epoch: int) -> Desired | None:
    """The component's desired state from a bulk build, when one is due (see the module's text),
    or built meanwhile by another thread; None when the caller should build it on its own.

    `epoch` was read by the caller's heartbeat before this call."""
    called = time.monotonic()
    bulk = _bulk(db.url)
    if len(bulk.met) < BULK_MIN:
        bulk.met.add(component_id)
    if bulk.building:  # one is running (e.g. for newcomers, `build_for_newcomers`): wait for it
        with bulk.lock:
            found = cached_desired(db.url, component_id, epoch)
        if found is not None:
            return found
    if not bulk.due(epoch, called):
        return None
    with bulk.lock:
        found = cached_desired(db.url, component_id, epoch)
        if found is None and bulk.epoch is not None and bulk.started >= called:
            # A bulk build that began after the caller's epoch was read: as fresh as its own.
            found = cached_desired(db.url, component_id, bulk.epoch)
        if found is not None or not bulk.due(epoch, time.monotonic()):
            return found
        read = _build(db, bulk)
        return cached_desired(db.url, component_id, read)


def build_all(db: Database) -> int:
    """Build every component's desired state now, as a cold heartbeat's bulk build does (a process
    does this before it serves, so its first heartbeats find their states); returns how many."""
    bulk = _bulk(db.url)
    with bulk.lock:
        _build(db, bulk)
        return bulk.built


def build_for_newcomers(db: Database, epoch: int, newcomers: int) -> bool:
    """Build every desired state now if `newcomers` components (tokens a process had not seen, read
    under `epoch`) are more than `BULK_MIN` and a bulk build is due under `epoch` but for the
    components met: their first heartbeats would each build alone until `BULK_MIN` had."""
    bulk = _bulk(db.url)
    if newcomers < BULK_MIN:
        return False
    with bulk.lock:
        at = time.monotonic()
        stale = bulk.epoch != epoch or at - bulk.started > bulk.keep
        if not stale or at - bulk.ended < SPACING * bulk.length:
            return False
        _build(db, bulk)
        return True


def _build(db: Database, bulk: _Bulk) -> int:
    """One bulk build (the caller holds `bulk.lock`); returns the epoch its states are kept under."""
    started = time.monotonic()
    bulk.building = True
    try:
        with db.session() as s:
            read = desired_epoch.read(s)  # first: what is read after it is at least as new
            expires = s.scalar(  # the first revoked serial to leave the lists built below
                select(func.min(ComponentCertificate.not_after)).where(
                    ComponentCertificate.revoked_at.is_not(None), ComponentCertificate.not_after > now()
                )
            )
            built = desired_all(s)
    finally:
        bulk.building = False
    keep = KEEP_SECONDS if expires is None else min(KEEP_SECONDS, max(0.0, expires - now()))
    for cid, state in built.items():
        remember_desired(db.url, cid, read, state, keep)
    bulk.epoch, bulk.started, bulk.ended, bulk.keep = read, started, time.monotonic(), keep
    bulk.length, bulk.built = bulk.ended - started, len(built)
    log.info("built %d desired states in one pass in %.2f s", len(built), bulk.length)
    return read
