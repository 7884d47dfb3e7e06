"""Reading and changing replicated items from workflow tasks (each call its own transaction)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from siterecovery.dr.fabric_access import open_fabric
from siterecovery.errors import not_found
from siterecovery.fabrics.base import Fabric, PowerState
from siterecovery.store.context import current
from siterecovery.store.jobs import around_tasks
from siterecovery.store.models import Component, Policy, ReplicatedItem, by_id_or_name, now
from siterecovery.store.models import Fabric as FabricRow
from siterecovery.store.record import ItemRecord, Site
from siterecovery.store.states import ComponentKind, Direction, ProtectionState


@dataclass(frozen=True)
class ItemSnapshot:
    id: str
    name: str
    state: ProtectionState
    direction: Direction
    policy_id: str
    group_id: str | None
    record: ItemRecord


def snapshot(item: ReplicatedItem) -> ItemSnapshot:
    return ItemSnapshot(
        item.id,
        item.name,
        item.state,
        item.direction,
        item.policy_id,
        item.group_id,
        ItemRecord.model_validate(item.details),
    )


def load(item_id: str) -> ItemSnapshot:
    with current().db.session() as s:
        return snapshot(get_item(s, item_id))


def get_item(s: Session, ident: str) -> ReplicatedItem:
    row = by_id_or_name(s, ReplicatedItem, ident)
    if row is None:
        raise not_found("replicated item", ident)
    return row


def update(item_id: str, change: Callable[[ReplicatedItem, ItemRecord], None]) -> ItemSnapshot:
    """Apply `change` to the item and its record in one transaction; returns the new snapshot."""
    with current().db.session() as s:
        item = get_item(s, item_id)
        rec = ItemRecord.model_validate(item.details)
        change(item, rec)
        item.details = rec.model_dump(mode="json")
        item.updated_at = now()
        return snapshot(item)


def set_state(
    item_id: str, state: ProtectionState, direction: Direction | None = None, policy_id: str | None = None
) -> ItemSnapshot:
    def change(item: ReplicatedItem, _: ItemRecord) -> None:
        item.state = state
        if direction is not None:
            item.direction = direction
        if policy_id is not None:
            item.policy_id = policy_id

    return update(item_id, change)


# The providers a task opened, by fabric id: one session each per task, closed when it ends.
_opened: ContextVar[dict[str, Fabric] | None] = ContextVar("opened_fabrics", default=None)


@contextmanager
def fabric_sessions() -> Iterator[None]:
    """Around every task: a vCenter login per fabric for the task, logged out at its end (vCenter
    caps the sessions an account may hold, and tasks run for the life of the server)."""
    token = _opened.set({})
    try:
        yield
    finally:
        opened = _opened.get() or {}
        _opened.reset(token)
        for provider in opened.values():
            close = getattr(provider, "close", None)
            if callable(close):
                close()


around_tasks(fabric_sessions)


def fabric(fabric_id: str) -> Fabric:
    opened = _opened.get()
    if opened is not None and fabric_id in opened:
        return opened[fabric_id]
    with current().db.session() as s:
        row = s.get(FabricRow, fabric_id)
        if row is None:
            raise not_found("fabric", fabric_id)
        provider = open_fabric(current(), row)
    if opened is not None:
        opened[fabric_id] = provider
    return provider


def site_fabric(rec: ItemRecord, site: Site) -> Fabric:
    return fabric(rec.onprem_fabric if site is Site.ONPREM else rec.cloud_fabric)


def component(s: Session, ident: str, kind: ComponentKind) -> Component | None:
    return s.scalar(
        select(Component).where(Component.kind == kind, (Component.id == ident) | (Component.name == ident))
    )


def policy(s: Session, policy_id: str) -> Policy:
    row = s.get(Policy, policy_id)
    if row is None:
        raise not_found("policy", policy_id)
    return row


def set_power(fabric: Fabric, machine: str, wanted: PowerState) -> bool:
    """Power a machine on or off unless it already is (a replayed task must not fail); True if changed."""
    found = fabric.discover().machine(machine)
    if found is None or found.power_state is wanted:
        return False
    if wanted is PowerState.ON:
        fabric.power_on(machine)
    else:
        fabric.power_off(machine)
    return True
