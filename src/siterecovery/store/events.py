"""Events (something happened) and alerts (a condition that stays active until it clears)."""

from __future__ import annotations

from sqlalchemy import Select, select
from sqlalchemy.orm import Session

from siterecovery.store.models import Event, now
from siterecovery.store.states import Severity


def _add(
    s: Session, severity: Severity, code: str, message: str, object_type: str, object_id: str, *, alert: bool
) -> None:
    # An alert opens active (until it clears); a plain event is never active.
    s.add(
        Event(
            severity=severity,
            code=code,
            message=message,
            object_type=object_type,
            object_id=object_id,
            alert=alert,
            active=alert,
        )
    )


def record_event(
    s: Session, severity: Severity, code: str, message: str, object_type: str = "", object_id: str = ""
) -> None:
    _add(s, severity, code, message, object_type, object_id, alert=False)


def _active(code: str, object_type: str, object_id: str) -> Select[Event]:
    """The active alerts with this code about this object (one, unless raised concurrently)."""
    return select(Event).where(
        Event.alert.is_(True),
        Event.active.is_(True),
        Event.code == code,
        Event.object_type == object_type,
        Event.object_id == object_id,
    )


def raise_alert(
    s: Session, severity: Severity, code: str, message: str, object_type: str, object_id: str
) -> None:
    """Open an alert unless the same one is already active (alerts do not repeat while active)."""
    existing = s.scalar(_active(code, object_type, object_id))
    if existing is not None:
        if existing.severity != severity:
            existing.severity = severity
            existing.message = message
        return
    _add(s, severity, code, message, object_type, object_id, alert=True)


def clear_alert(s: Session, code: str, object_type: str, object_id: str) -> None:
    for ev in s.scalars(_active(code, object_type, object_id)):
        ev.active = False
        ev.cleared_at = now()
