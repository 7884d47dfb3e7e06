"""Replicated items: the protected machines and their replication state."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Query, Request, Response
from pydantic import BaseModel
from sqlalchemy import select
from sqlalchemy.orm import Session, defer

from siterecovery.control.api.deps import reader, session
from siterecovery.control.api.paging import page
from siterecovery.errors import not_found
from siterecovery.store.models import ReplicatedItem, by_id_or_name
from siterecovery.store.tokens import Principal

router = APIRouter(prefix="/api/replicatedItems", tags=["replicated items"])


class ItemOut(BaseModel):
    id: str
    name: str
    machine: str
    direction: str
    state: str
    health: str
    policy_id: str
    process_server_id: str | None
    master_target_id: str | None
    group_id: str | None
    rpo_seconds: float | None
    details: dict[str, object]


def item_view(i: ReplicatedItem, details: bool = True) -> ItemOut:
    return ItemOut(
        id=i.id,
        name=i.name,
        machine=i.machine,
        direction=i.direction,
        state=i.state,
        health=i.health,
        policy_id=i.policy_id,
        process_server_id=i.process_server_id,
        master_target_id=i.master_target_id,
        group_id=i.group_id,
        rpo_seconds=i.rpo_seconds,
        details=i.details if details else {},
    )


def find_item(s: Session, ident: str) -> ReplicatedItem:
    row = by_id_or_name(s, ReplicatedItem, ident)
    if row is None:
        raise not_found("replicated item", ident)
    return row


@router.get("")
def list_items(
    request: Request,
    response: Response,
    limit: int = Query(default=500, ge=1, le=1000),
    after: str | None = Query(default=None, max_length=200, description="the name the last page ended at"),
    state: str | None = Query(default=None, max_length=30),
    health: str | None = Query(default=None, max_length=20),
    direction: str | None = Query(default=None, max_length=30),
    server: str | None = Query(default=None, max_length=64, description="process server or master target id"),
    details: bool = Query(default=True, description="false: without each item's full record"),
    _: Principal = Depends(reader),
    s: Session = Depends(session, scope="function"),
) -> list[ItemOut]:
    """Items by name, a page at a time (see `paging`); filterable by state, health, direction, server."""
    q = select(ReplicatedItem).order_by(ReplicatedItem.name).limit(limit + 1)
    if after is not None:
        q = q.where(ReplicatedItem.name > after)
    if state:
        q = q.where(ReplicatedItem.state == state)
    if health:
        q = q.where(ReplicatedItem.health == health)
    if direction:
        q = q.where(ReplicatedItem.direction == direction)
    if server:
        q = q.where(
            (ReplicatedItem.process_server_id == server) | (ReplicatedItem.master_target_id == server)
        )
    if not details:
        q = q.options(defer(ReplicatedItem.details))
    rows = page(list(s.scalars(q)), limit, request, response, lambda i: i.name)
    return [item_view(i, details) for i in rows]


@router.get("/{ident}")
def show_item(
    ident: str, _: Principal = Depends(reader), s: Session = Depends(session, scope="function")
) -> ItemOut:
    return item_view(find_item(s, ident))
