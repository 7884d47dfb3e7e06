"""Request dependencies: the control plane, a database session and the caller's role."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from siterecovery.control.auth import Principal, authenticate
from siterecovery.control.context import ControlPlane, current
from siterecovery.control.events import record_event
from siterecovery.control.states import Role, Severity

_bearer = HTTPBearer(auto_error=False)


def control_plane() -> ControlPlane:
    return current()


def session(cp: ControlPlane = Depends(control_plane)) -> Iterator[Session]:
    with cp.db.session() as s:
        yield s


def principal(
    request: Request,
    creds: HTTPAuthorizationCredentials | None = Depends(_bearer),
    cp: ControlPlane = Depends(control_plane),
) -> Principal:
    if creds is None or creds.scheme.lower() != "bearer":
        raise HTTPException(401, "This API needs a bearer token.")
    with cp.db.session() as s:
        who = authenticate(s, creds.credentials)
        if who is None:
            record_event(
                s,
                Severity.WARNING,
                "token-invalid",
                f"A request from {request.client.host if request.client else '?'} "
                "used an unknown or revoked token.",
            )
    if who is None:
        raise HTTPException(401, "The bearer token is unknown or revoked.")
    return who


def require(role: Role) -> Callable[[Principal], Principal]:
    def check(who: Principal = Depends(principal)) -> Principal:
        if not who.can(role):
            raise HTTPException(403, f"Role {who.role.value} may not do this; it needs {role.value}.")
        return who

    return check


reader = require(Role.READER)
operator = require(Role.OPERATOR)
admin = require(Role.ADMIN)
component = require(Role.COMPONENT)
