"""Events and alerts."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Query
from sqlalchemy import select
from sqlalchemy.orm import Session

from siterecovery.control.api.deps import reader, session
from siterecovery.control.auth import Principal
from siterecovery.control.db import Event
from siterecovery.control.schemas import EventOut

router = APIRouter(prefix="/api/events", tags=["events"])


@router.get("")
def list_events(
    alerts: bool = False,
    active: bool = False,
    limit: int = Query(default=200, ge=1, le=5000),
    _: Principal = Depends(reader),
    s: Session = Depends(session, scope="function"),
) -> list[EventOut]:
    q = select(Event).order_by(Event.id.desc()).limit(limit)
    if alerts:
        q = q.where(Event.alert.is_(True))
    if active:
        q = q.where(Event.active.is_(True))
    return [
        EventOut(
            id=e.id,
            time=e.time,
            severity=e.severity,
            alert=e.alert,
            active=e.active,
            code=e.code,
            message=e.message,
            object_type=e.object_type,
            object_id=e.object_id,
        )
        for e in s.scalars(q)
    ]
