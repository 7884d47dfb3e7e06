"""Replicated items: the protected machines and their replication state."""

from __future__ import annotations

import functools
from typing import Any

from fastapi import APIRouter, Depends, Query, Request, Response
from pydantic import BaseModel
from sqlalchemy import ColumnElement, Text, cast, func, literal_column, select
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from siterecovery.control.api.deps import reader_now, session
from siterecovery.control.api.paging import NEXT_HEADER, page
from siterecovery.errors import not_found
from siterecovery.store.context import ControlPlane, current
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


# The list's columns. Each row is written out as JSON by the database itself (one text per item,
# its `details` embedded as stored): a page is answered without decoding, validating or encoding
# any item in Python — at 100 items a page, building and encoding each item's dict here was most
# of the route's CPU after the record itself stopped being decoded.
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
_PAGING = {NEXT_HEADER.lower(), "link"}  # what `page` set on `response`: this route answers its own


@functools.cache  # built once per dialect and choice: 24 elements coerced per request otherwise
def _as_json(dialect: str, details: bool) -> ColumnElement[str]:
    """An item's `ItemOut` as JSON text, built by the database (PostgreSQL or SQLite)."""
    keyed: list[Any] = []
    for column in _SUMMARY:
        keyed += [literal_column(f"'{column.key}'"), column]  # keys inline: untyped parameters
    if dialect == "postgresql":
        record = ReplicatedItem.details if details else literal_column("'{}'::json")
        return cast(func.json_build_object(*keyed, literal_column("'details'"), record), Text)
    record = func.json(ReplicatedItem.details) if details else func.json_object()
    return func.json_object(*keyed, literal_column("'details'"), record)


def item_page(
    conn: Connection,
    limit: int,
    after: str | None = None,
    state: str | None = None,
    health: str | None = None,
    direction: str | None = None,
    server: str | None = None,
    details: bool = True,
) -> list[tuple[str, str]]:
    """(name, the item's JSON) of up to `limit` + 1 items by name after `after`, filtered."""
    q = select(ReplicatedItem.name, _as_json(conn.dialect.name, details))
    q = q.order_by(ReplicatedItem.name).limit(limit + 1)
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
    return [(str(name), str(text_)) for name, text_ in conn.execute(q)]


@router.get("", response_model=list[ItemOut])
async def list_items(
    request: Request,
    response: Response,
    limit: int = Query(default=500, ge=1, le=1000),
    after: str | None = Query(default=None, max_length=200, description="the name the last page ended at"),
    state: str | None = Query(default=None, max_length=30),
    health: str | None = Query(default=None, max_length=20),
    direction: str | None = Query(default=None, max_length=30),
    server: str | None = Query(default=None, max_length=64, description="process server or master target id"),
    details: bool = Query(default=True, description="false: without each item's full record"),
    _: Principal = Depends(reader_now),
) -> Response:
    """Items by name, a page at a time (see `paging`); filterable by state, health, direction, server."""
    # One hop to a worker thread for the read (a sync route with a session dependency took three:
    # the session's start, the route, the session's end — a fifth of a page's CPU under load).
    found = await run_in_threadpool(
        _read_page, current(), limit, after, state, health, direction, server, details
    )
    rows = page(found, limit, request, response, lambda row: row[0])
    return Response(
        "[" + ",".join(row[1] for row in rows) + "]",
        media_type="application/json",
        headers={k: v for k, v in response.headers.items() if k.lower() in _PAGING},
    )


def _read_page(
    cp: ControlPlane,
    limit: int,
    after: str | None,
    state: str | None,
    health: str | None,
    direction: str | None,
    server: str | None,
    details: bool,
) -> list[tuple[str, str]]:
    with cp.db.engine.connect() as conn:  # a read: nothing to commit
        return item_page(conn, limit, after, state, health, direction, server, details)


@router.get("/{ident}")
def show_item(
    ident: str, _: Principal = Depends(reader_now), s: Session = Depends(session, scope="function")
) -> ItemOut:
    return item_view(find_item(s, ident))
