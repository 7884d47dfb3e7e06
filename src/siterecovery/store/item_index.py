"""The items-by-component index, kept up to date whenever an item's details change.

A component's desired state is derived from the items that name it (dr.desired). Deriving it by
reading every item made each heartbeat cost O(all items); this index (`item_components`) lets a
heartbeat read only the component's own items. It is maintained by a flush hook on every session
of the control plane, so no workflow has to remember it: whatever writes `details` rewrites the
item's rows in the same transaction, and bumps the item's `details_rev`.

Which components an item concerns (a superset is harmless, a missing one is a bug): its current
replication's agent, process server and master target; the master target of a failover held
until commit; and the master targets and process servers of its ended pairs (they must discard).
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import delete, event, insert, inspect
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session, sessionmaker

from siterecovery.store.models import ItemComponent, ReplicatedItem
from siterecovery.store.record import ItemRecord

AGENT_PREFIX = "agent:"


def agent_key(agent_name: str) -> str:
    return AGENT_PREFIX + agent_name


def components_of(details: dict[str, Any]) -> set[str]:
    """The index keys of an item with these details."""
    rec = ItemRecord.model_validate(details)
    keys: set[str] = set()
    rep = rec.replication
    if rep is not None:
        keys |= {agent_key(f"{rep.source_site.value}/{rep.source_machine}"), rep.master_target}
        keys.add(rep.process_server)
    if rec.held is not None:
        keys.add(rec.held.replication.master_target)
    for e in rec.ended_pairs:
        keys.add(e.master_target)
        keys.add(e.process_server)
    keys.discard("")
    return keys


def write_links(conn: Connection, item_id: str, details: dict[str, Any] | None) -> None:
    conn.execute(delete(ItemComponent).where(ItemComponent.item_id == item_id))
    keys = components_of(details) if details is not None else set()
    if keys:
        conn.execute(insert(ItemComponent), [{"item_id": item_id, "component": k} for k in sorted(keys)])


def _details_changed(obj: object) -> bool:
    return isinstance(obj, ReplicatedItem) and inspect(obj).attrs.details.history.has_changes()


def _before_flush(session: Session, _context: Any, _instances: Any) -> None:
    for item in (*session.new, *session.dirty):
        if _details_changed(item):
            assert isinstance(item, ReplicatedItem)
            item.details_rev = (item.details_rev or 0) + 1


def _after_flush(session: Session, _context: Any) -> None:
    changed = [obj for obj in (*session.new, *session.dirty) if _details_changed(obj)]
    gone = [obj for obj in session.deleted if isinstance(obj, ReplicatedItem)]
    if not changed and not gone:
        return
    conn = session.connection()
    for item in changed:
        write_links(conn, item.id, item.details)
    for item in gone:
        write_links(conn, item.id, None)


def install(factory: sessionmaker[Session]) -> None:
    """Keep the index on every session this factory makes."""
    event.listen(factory, "before_flush", _before_flush)
    event.listen(factory, "after_flush", _after_flush)
