"""Replicated items: the protected machines and their replication state."""

from __future__ import annotations

from fastapi import APIRouter, Depends
from pydantic import BaseModel
from sqlalchemy import select
from sqlalchemy.orm import Session

from siterecovery.control.api.deps import reader, session
from siterecovery.control.auth import Principal
from siterecovery.control.db import ReplicatedItem, by_id_or_name
from siterecovery.errors import not_found

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


def item_view(i: ReplicatedItem) -> ItemOut:
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
        details=i.details,
    )


def find_item(s: Session, ident: str) -> ReplicatedItem:
    row = by_id_or_name(s, ReplicatedItem, ident)
    if row is None:
        raise not_found("replicated item", ident)
    return row


@router.get("")
def list_items(
    _: Principal = Depends(reader), s: Session = Depends(session, scope="function")
) -> list[ItemOut]:
    return [item_view(i) for i in s.scalars(select(ReplicatedItem).order_by(ReplicatedItem.name))]


@router.get("/{ident}")
def show_item(
    ident: str, _: Principal = Depends(reader), s: Session = Depends(session, scope="function")
) -> ItemOut:
    return item_view(find_item(s, ident))
