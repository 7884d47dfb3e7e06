"""Bearer tokens with roles (reader < operator < admin; components have their own role).

Tokens are random secrets shown once; only their SHA-256 is stored. Readers can look at
everything and change nothing. A user token expires (`expires_at`, default 30 days from its
creation) and can be revoked; a component token is replaced, and the old one revoked, whenever
the component registers again. The initial admin token does not expire: it is the way back in,
and the operator replaces it (create another admin token, revoke the initial one).
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from enum import StrEnum

from sqlalchemy import select
from sqlalchemy.orm import Session

from siterecovery.store.models import Token, new_id, now
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


def check_token(session: Session, secret: str) -> Principal | TokenRefusal:
    """The principal behind `secret`, or why it is refused."""
    row = session.scalar(select(Token).where(Token.secret_hash == hash_secret(secret)))
    if row is None:
        return TokenRefusal.UNKNOWN
    if row.revoked:
        return TokenRefusal.REVOKED
    if row.expires_at is not None and row.expires_at <= now():
        return TokenRefusal.EXPIRED
    return Principal(row.id, row.name, row.role, row.component_id)


def authenticate(session: Session, secret: str) -> Principal | None:
    who = check_token(session, secret)
    return who if isinstance(who, Principal) else None
