"""Request dependencies: the control plane, a database session and the caller's role."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator

from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from siterecovery.control.edges import PRINCIPAL, REFUSALS, identify
from siterecovery.errors import Problem, SiteRecoveryError, Status
from siterecovery.store.context import ControlPlane, current
from siterecovery.store.states import Role
from siterecovery.store.tokens import Principal

_bearer = HTTPBearer(auto_error=False)


def control_plane() -> ControlPlane:
    return current()


def session(cp: ControlPlane = Depends(control_plane)) -> Iterator[Session]:
    with cp.db.session() as s:
        yield s


def principal(
    request: Request,
    creds: HTTPAuthorizationCredentials | None = Depends(_bearer),
) -> Principal:
    # The edge middleware has checked the token before the body was read (control/edges.py).
    who = getattr(request.state, PRINCIPAL, None)
    if isinstance(who, Principal):
        return who
    client = request.client.host if request.client else "?"
    found = identify(f"Bearer {creds.credentials}" if creds else None, client)
    if not isinstance(found, Principal):
        raise SiteRecoveryError(
            Problem(found.value, REFUSALS[found], "Send a valid bearer token (`tokens create`)."),
            Status.UNAUTHORIZED,
        )
    return found


def require(role: Role) -> Callable[[Principal], Principal]:
    def check(who: Principal = Depends(principal)) -> Principal:
        if not who.can(role):
            raise HTTPException(403, f"Role {who.role.value} may not do this; it needs {role.value}.")
        return who

    return check


async def calling_component(
    request: Request,
    creds: HTTPAuthorizationCredentials | None = Depends(_bearer),
) -> Principal:
    """The calling component, without a hop to the thread pool (for the heartbeat route).

    The edge middleware has identified the caller already; only a request it did not see is
    looked up here, in a worker thread."""
    found = getattr(request.state, PRINCIPAL, None)
    who = found if isinstance(found, Principal) else await run_in_threadpool(principal, request, creds)
    if not who.can(Role.COMPONENT):
        raise HTTPException(403, f"Role {who.role.value} may not do this; it needs {Role.COMPONENT.value}.")
    return who


def require_now(role: Role) -> Callable[..., Awaitable[Principal]]:
    """`require` without hops to the thread pool: a sync dependency runs in a worker thread, and
    `require` is two (the principal, the check) — under load each waited behind the pool's other
    work and the GIL, most of a cheap route's time (the item list: 3.3 ms of CPU, 130-270 ms p99).
    The edge middleware has identified the caller already; only a request it did not see is
    looked up, in a worker thread (as `calling_component`)."""

    async def check(
        request: Request, creds: HTTPAuthorizationCredentials | None = Depends(_bearer)
    ) -> Principal:
        found = getattr(request.state, PRINCIPAL, None)
        who = found if isinstance(found, Principal) else await run_in_threadpool(principal, request, creds)
        if not who.can(role):
            raise HTTPException(403, f"Role {who.role.value} may not do this; it needs {role.value}.")
        return who

    return check


reader = require(Role.READER)
reader_now = require_now(Role.READER)
operator = require(Role.OPERATOR)
admin = require(Role.ADMIN)
component = require(Role.COMPONENT)
