"""Replicated items: the protected machines and their replication state."""

from __future__ import annotations

import json

from fastapi import APIRouter, Depends, Query, Request, Response
from pydantic import BaseModel
from sqlalchemy import Text, cast, select
from sqlalchemy.orm import Session

from siterecovery.control.api.deps import reader, session
from siterecovery.control.api.paging import NEXT_HEADER, page
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


# The list's columns, `details` as the JSON text it is stored as: a page is written out without
# decoding, validating and re-encoding every item's record (at 100 items a page that was most
# of the route's time; the record is the client's to read).
_SUMMARY = (
    ReplicatedItem.id,
    ReplicatedItem.name,
    ReplicatedItem.machine,
    ReplicatedItem.direction,
    ReplicatedItem.state,
    ReplicatedItem.health,
    ReplicatedItem.policy_id,
    ReplicatedItem.process_server_id,
    ReplicatedItem.master_target_id,
    ReplicatedItem.group_id,
    ReplicatedItem.rpo_seconds,
)
_FIELDS = tuple(c.key for c in _SUMMARY)
_PAGING = {NEXT_HEADER.lower(), "link"}  # what `page` set on `response`: this route answers its own


@router.get("", response_model=list[ItemOut])
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
) -> Response:
    """Items by name, a page at a time (see `paging`); filterable by state, health, direction, server."""
    record = cast(ReplicatedItem.details, Text) if details else None
    q = select(*_SUMMARY, *([record] if record is not None else [])).order_by(ReplicatedItem.name)
    q = q.limit(limit + 1)
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
    rows = page(list(s.execute(q)), limit, request, response, lambda row: str(row.name))
    parts = []
    for row in rows:
        summary = json.dumps(dict(zip(_FIELDS, row[: len(_FIELDS)], strict=True)))
        stored = row[len(_FIELDS)] if details else None
        parts.append(f'{summary[:-1]}, "details": {stored or "{}"}}}')
    return Response(
        "[" + ", ".join(parts) + "]",
        media_type="application/json",
        headers={k: v for k, v in response.headers.items() if k.lower() in _PAGING},
    )


@router.get("/{ident}")
def show_item(
    ident: str, _: Principal = Depends(reader), s: Session = Depends(session, scope="function")
) -> ItemOut:
    return item_view(find_item(s, ident))
