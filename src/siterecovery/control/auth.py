"""Bearer tokens with roles (reader < operator < admin; components have their own role).

Tokens are random secrets shown once; only their SHA-256 is stored. Readers can look at
everything and change nothing.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from siterecovery.control.db import Token, new_id
from siterecovery.control.states import Role

_RANK = {Role.READER: 0, Role.OPERATOR: 1, Role.ADMIN: 2}


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


def create_token(session: Session, name: str, role: Role, component_id: str | None = None) -> str:
    secret = "sr_" + secrets.token_urlsafe(32)
    session.add(
        Token(
            id=new_id("tok"),
            name=name,
            role=role.value,
            secret_hash=hash_secret(secret),
            component_id=component_id,
        )
    )
    return secret


def authenticate(session: Session, secret: str) -> Principal | None:
    row = session.scalar(
        select(Token).where(Token.secret_hash == hash_secret(secret), Token.revoked.is_(False))
    )
    if row is None:
        return None
    return Principal(row.id, row.name, Role(row.role), row.component_id)
