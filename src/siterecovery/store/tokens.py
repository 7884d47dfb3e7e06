"""Bearer tokens with roles (reader < operator < admin; components have their own role).

Tokens are random secrets shown once; only their SHA-256 is stored. Readers can look at
everything and change nothing. A user token expires (`expires_at`, default 30 days from its
creation) and can be revoked; a component token is replaced, and the old one revoked, whenever
the component registers again. The initial admin token does not expire: it is the way back in,
and the operator replaces it (create another admin token, revoke the initial one).

Every API request presents a token, so looking it up (a session, a query, a thread hop) was a
good part of an idle component's heartbeat. A verified token is therefore remembered for a few
seconds (`TokenCache`, `token_cache_seconds`). Revoking any token in this process forgets every
remembered one (when the flag is set and again when it commits, so a lookup racing the revoke
cannot re-remember it); expiry is checked on every use. Another server process on the same
database, or an edit of the database behind the server's back, is seen within the TTL.

Every component's token can also be remembered in one statement (`TokenCache.remember_components`):
when a process starts, and when a burst of components this process has not met yet heartbeats
(after a restart, or after many registrations), so their first heartbeats take the same lean way
as the next ones instead of a session and a query each. The entries are exactly what a lookup of
each token would remember.
"""

from __future__ import annotations

import hashlib
import secrets
import threading
import time
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from sqlalchemy import event, select
from sqlalchemy.orm import Session, object_session

from siterecovery.store.models import Component, Token, new_id, now
from siterecovery.store.states import Role

_RANK = {Role.READER: 0, Role.OPERATOR: 1, Role.ADMIN: 2}


class TokenRefusal(StrEnum):
    """Why a presented token was refused; the value is the 401's error code."""

    MISSING = "unauthenticated"
    UNKNOWN = "token-unknown"
    REVOKED = "token-revoked"
    EXPIRED = "token-expired"


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


@dataclass(frozen=True)
class Principal:
    token_id: str
    name: str
    role: Role
    component_id: str | None = None

    def can(self, needed: Role) -> bool:
        if needed is Role.COMPONENT:
            return self.role is Role.COMPONENT
        if self.role is Role.COMPONENT:
            return False
        return _RANK[self.role] >= _RANK[needed]


def create_token(
    session: Session,
    name: str,
    role: Role,
    component_id: str | None = None,
    expires_at: float | None = None,
) -> str:
    secret = "sr_" + secrets.token_urlsafe(32)
    session.add(
        Token(
            id=new_id("tok"),
            name=name,
            role=role,
            secret_hash=hash_secret(secret),
            component_id=component_id,
            expires_at=expires_at,
        )
    )
    return secret


class _Revocations:
    """A counter bumped by every revoke in this process: remembered tokens older than it are void."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.generation = 0

    def bump(self) -> None:
        with self._lock:
            self.generation += 1


REVOCATIONS = _Revocations()
_REVOKED_KEY = "siterecovery.token_revoked"


@event.listens_for(Token.revoked, "set")
def _on_revoked(target: Token, value: Any, _old: Any, _initiator: Any) -> None:
    if value:
        REVOCATIONS.bump()
        session = object_session(target)
        if session is not None:
            session.info[_REVOKED_KEY] = True


@event.listens_for(Session, "after_commit")
def _on_commit(session: Session) -> None:
    # A lookup between the flag being set and this commit read the row still valid; void it too.
    if session.info.pop(_REVOKED_KEY, False):
        REVOCATIONS.bump()


@dataclass(frozen=True)
class _Remembered:
    who: Principal
    expires_at: float | None  # the token's own expiry (wall clock)
    until: float  # when this entry is no longer trusted (monotonic)...
    generation: int
    epoch: int | None  # ...unless the database's desired epoch is still this (`store.desired_epoch`)


class TokenCache:
    """Verified tokens (by their hash) to their principal, for `ttl` seconds; refusals are not kept."""

    MAX_ENTRIES = 50_000  # one per live component and user; cleared whole past that

    def __init__(self, ttl: float) -> None:
        self.ttl = ttl
        self._entries: dict[str, _Remembered] = {}

    def get(self, secret: str, epoch: int | None = None) -> Principal | None:
        """The remembered principal; past `ttl` only while `epoch` — the desired epoch read from
        the database within `ttl` seconds — is the one read before the token was (any change of a
        token in any process gives the epoch a new value)."""
        digest = hash_secret(secret)
        entry = self._entries.get(digest)
        if entry is None:
            return None
        expired = entry.expires_at is not None and entry.expires_at <= now()
        stale = time.monotonic() >= entry.until and (epoch is None or epoch != entry.epoch)
        if expired or entry.generation != REVOCATIONS.generation or stale:
            self._entries.pop(digest, None)
            return None
        return entry.who

    def check(self, session: Session, secret: str, epoch: int | None = None) -> Principal | TokenRefusal:
        """`check_token`, remembering a valid answer (with `epoch`, a recent desired epoch read
        before this lookup, see `get`)."""
        generation = REVOCATIONS.generation  # read before the row: a revoke after it voids the entry
        who, expires_at = _lookup(session, secret)
        if isinstance(who, Principal) and self.ttl > 0 and generation == REVOCATIONS.generation:
            if len(self._entries) >= self.MAX_ENTRIES:
                self._entries.clear()
            until = time.monotonic() + self.ttl
            self._entries[hash_secret(secret)] = _Remembered(who, expires_at, until, generation, epoch)
        return who

    def remember_components(self, session: Session, epoch: int | None = None) -> tuple[dict[str, str], int]:
        """Remember every valid component token as `check` would after looking it up (`epoch`:
        as for `check`); returns every registered component's kind by id (a token's component
        and its kind are read in the same statement) and how many tokens were not remembered
        before."""
        generation = REVOCATIONS.generation  # as in `check`: a revoke after this voids what is read
        rows = session.execute(
            select(
                Token.secret_hash, Token.id, Token.name, Token.component_id, Token.expires_at, Component.kind
            )
            .join(Component, Component.id == Token.component_id)
            .where(Token.role == Role.COMPONENT, Token.revoked.is_(False))
        ).all()
        kinds = {str(component_id): str(kind) for _, _, _, component_id, _, kind in rows}
        newcomers = sum(1 for row in rows if row[0] not in self._entries)
        if self.ttl <= 0 or generation != REVOCATIONS.generation:
            return kinds, newcomers
        if len(self._entries) + len(rows) > self.MAX_ENTRIES:
            self._entries.clear()
        until, wall = time.monotonic() + self.ttl, now()
        for digest, token_id, name, component_id, expires_at, _ in rows[: self.MAX_ENTRIES]:
            if expires_at is not None and expires_at <= wall:
                continue  # refused by a lookup: not remembered
            who = Principal(token_id, name, Role.COMPONENT, component_id)
            self._entries[digest] = _Remembered(who, expires_at, until, generation, epoch)
        return kinds, newcomers


def _lookup(session: Session, secret: str) -> tuple[Principal | TokenRefusal, float | None]:
    row = session.scalar(select(Token).where(Token.secret_hash == hash_secret(secret)))
    if row is None:
        return TokenRefusal.UNKNOWN, None
    if row.revoked:
        return TokenRefusal.REVOKED, None
    if row.expires_at is not None and row.expires_at <= now():
        return TokenRefusal.EXPIRED, None
    return Principal(row.id, row.name, row.role, row.component_id), row.expires_at


def check_token(session: Session, secret: str) -> Principal | TokenRefusal:
    """The principal behind `secret`, or why it is refused."""
    return _lookup(session, secret)[0]


def authenticate(session: Session, secret: str) -> Principal | None:
    who = check_token(session, secret)
    return who if isinstance(who, Principal) else None
