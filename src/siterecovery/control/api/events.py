"""Events and alerts."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Query, Request, Response
from sqlalchemy import select
from sqlalchemy.orm import Session

from siterecovery.control.api.deps import reader, session
from siterecovery.control.api.paging import page
from siterecovery.control.schemas import EventOut
from siterecovery.store.models import Event
from siterecovery.store.tokens import Principal

router = APIRouter(prefix="/api/events", tags=["events"])


def find_events(
    s: Session,
    alerts: bool = False,
    active: bool = False,
    limit: int = 200,
    after: int | None = None,
    code: str | None = None,
    object_id: str | None = None,
) -> list[Event]:
    """Up to `limit` events, newest first, older than event `after`."""
    q = select(Event).order_by(Event.id.desc()).limit(limit)
    if after is not None:
        q = q.where(Event.id < after)
    if alerts:
        q = q.where(Event.alert.is_(True))
    if active:
        q = q.where(Event.active.is_(True))
    if code:
        q = q.where(Event.code == code)
    if object_id:
        q = q.where(Event.object_id == object_id)
    return list(s.scalars(q))


def event_view(e: Event) -> EventOut:
    return EventOut(
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


@router.get("")
def list_events(
    request: Request,
    response: Response,
    alerts: bool = False,
    active: bool = False,
    limit: int = Query(default=200, ge=1, le=5000),
    after: int | None = Query(default=None, ge=0, description="the event id the last page ended at"),
    code: str | None = Query(default=None, max_length=100),
    object_id: str | None = Query(default=None, max_length=64, description="events of this object only"),
    _: Principal = Depends(reader),
    s: Session = Depends(session, scope="function"),
) -> list[EventOut]:
    """Newest first, a page at a time (see `paging`); filterable by alert, active, code, object."""
    rows = find_events(s, alerts, active, limit + 1, after, code, object_id)
    return [event_view(e) for e in page(rows, limit, request, response, lambda e: str(e.id))]
