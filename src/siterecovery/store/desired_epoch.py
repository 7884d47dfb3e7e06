"""The desired epoch: one database value that changes whenever a desired state may change.

A component's desired state is derived from items, policies, components and certificates
(`dr.desired`). Computing it is most of an idle heartbeat's cost, yet it almost never changes.
Every session of the control plane notes, at flush, whether it changed anything a desired state
reads — an item's details or policy, a policy, a component's name, address or desired
settings, a certificate — and if so writes a new random value into `desired_epoch` just before
it commits, in the same transaction. A heartbeat reads the value first and reuses the desired
state this process computed under the same value (`dr.desired.cached_desired`); another server
process's change is seen at the next heartbeat because the value lives in the database.

The write is the transaction's last statement, so the row lock it takes is held only while
committing: no transaction waits for another's epoch while holding locks that one needs.
Liveness, statistics, health and RPO (what heartbeats and the monitor write) do not change it.

A token's revoke, expiry change or deletion changes it too, so the process's verified-token cache
(`store.tokens.TokenCache`) may keep trusting a token past its time-to-live while the heartbeat
writer keeps reading the same value (`note`, `recent`): a revoke through any process still
voids it within that time-to-live, and an agent heartbeating every 10 s no longer has its token
read again at every heartbeat because the time-to-live is 5 s.
"""

from __future__ import annotations

import secrets
import threading
import time
from typing import Any

from sqlalchemy import event, insert, inspect, select, update
from sqlalchemy.orm import Session, sessionmaker

from siterecovery.store.models import (
    Component,
    ComponentCertificate,
    DesiredEpoch,
    Policy,
    ReplicatedItem,
    Token,
)

_CHANGED = "desired-epoch-changed"  # session.info flag
EPOCH_ID = 1
# What of a row feeds some desired state (dr.desired); any change of the other classes does.
_WATCHED: dict[type, tuple[str, ...] | None] = {
    ReplicatedItem: ("details", "policy_id"),
    Component: ("kind", "name", "site", "address", "machine", "desired"),
    Policy: None,
    ComponentCertificate: None,
    Token: ("revoked", "expires_at", "role", "component_id", "secret_hash"),
}


def _concerns(obj: object, new_or_gone: bool) -> bool:
    fields = _WATCHED.get(type(obj), ())
    if fields == ():
        return False
    if new_or_gone or fields is None:
        return True
    attrs = inspect(obj).attrs
    return any(getattr(attrs, f).history.has_changes() for f in fields)


def _before_flush(session: Session, _context: Any, _instances: Any) -> None:
    if session.info.get(_CHANGED):
        return
    if any(_concerns(o, True) for o in (*session.new, *session.deleted)) or any(
        _concerns(o, False) for o in session.dirty
    ):
        session.info[_CHANGED] = True


def _before_commit(session: Session) -> None:
    session.flush()  # what is still pending is flushed after this hook: note it now
    if session.info.pop(_CHANGED, False):
        bump(session)


def _forget(session: Session, *_: Any) -> None:
    session.info.pop(_CHANGED, None)


def bump(session: Session) -> None:
    """Give the epoch a new value in this transaction."""
    value = secrets.randbits(62)
    done = session.execute(update(DesiredEpoch).where(DesiredEpoch.id == EPOCH_ID).values(value=value))
    if getattr(done, "rowcount", 1) == 0:  # a database made without the migration's row
        session.execute(insert(DesiredEpoch).values(id=EPOCH_ID, value=value))


def read(session: Session) -> int:
    """The current value (0 before anything was ever bumped)."""
    return session.scalar(select(DesiredEpoch.value).where(DesiredEpoch.id == EPOCH_ID)) or 0


def install(factory: sessionmaker[Session]) -> None:
    """Keep the epoch on every session this factory makes."""
    event.listen(factory, "before_flush", _before_flush)
    event.listen(factory, "before_commit", _before_commit)
    event.listen(factory, "after_rollback", _forget)


# Database URL -> (the value last read, when: monotonic). Read by the heartbeat writer per batch.
_SEEN: dict[str, tuple[int, float]] = {}
_SEEN_LOCK = threading.Lock()


def note(db_url: str, value: int) -> None:
    """The value was just read from this database (call only with a value read, never cached)."""
    with _SEEN_LOCK:
        _SEEN[db_url] = (value, time.monotonic())


def recent(db_url: str, max_age: float) -> int | None:
    """The value read from this database within `max_age` seconds, if any."""
    with _SEEN_LOCK:
        found = _SEEN.get(db_url)
    if found is None or time.monotonic() - found[1] > max_age:
        return None
    return found[0]
