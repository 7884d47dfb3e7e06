"""Events (something happened) and alerts (a condition that stays active until it clears)."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from siterecovery.store.models import Event, now
from siterecovery.store.states import Severity


def record_event(
    s: Session, severity: Severity, code: str, message: str, object_type: str = "", object_id: str = ""
) -> None:
    s.add(
        Event(
            severity=severity,
            code=code,
            message=message,
            object_type=object_type,
            object_id=object_id,
            alert=False,
            active=False,
        )
    )


def raise_alert(
    s: Session, severity: Severity, code: str, message: str, object_type: str, object_id: str
) -> None:
    """Open an alert unless the same one is already active (alerts do not repeat while active)."""
    existing = s.scalar(
        select(Event).where(
            Event.alert.is_(True),
            Event.active.is_(True),
            Event.code == code,
            Event.object_type == object_type,
            Event.object_id == object_id,
        )
    )
    if existing is not None:
        if existing.severity != severity:
            existing.severity = severity
            existing.message = message
        return
    s.add(
        Event(
            severity=severity,
            code=code,
            message=message,
            object_type=object_type,
            object_id=object_id,
            alert=True,
            active=True,
        )
    )


def clear_alert(s: Session, code: str, object_type: str, object_id: str) -> None:
    for ev in s.scalars(
        select(Event).where(
            Event.alert.is_(True),
            Event.active.is_(True),
            Event.code == code,
            Event.object_type == object_type,
            Event.object_id == object_id,
        )
    ):
        ev.active = False
        ev.cleared_at = now()
