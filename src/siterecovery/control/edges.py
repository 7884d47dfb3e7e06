"""The API's edge: who is calling and how much they may send, decided before any route runs.

A pure ASGI middleware, so that nothing of the request body has been read when it refuses:
- every `/api/` route but the public ones (the CA certificate, component registration) needs a
  valid bearer token; without one the answer is 401 with a code saying why (missing, unknown,
  revoked, expired) and the body is never read — an unauthenticated client cannot make the server
  read and parse 64 MiB of JSON;
- a body larger than `max_body_bytes` is refused with 413: at once when its Content-Length says
  so, else as soon as the bytes received pass the limit.
The principal found here is handed to the route's dependencies through the request state, so a
token is looked up once per request — and, while it is remembered (`store.tokens.TokenCache`),
without a session or a hop to a worker thread.
"""

from __future__ import annotations

from weakref import WeakKeyDictionary

from sqlalchemy import Engine
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from siterecovery.control.problems import problem_response
from siterecovery.errors import Problem
from siterecovery.store import desired_epoch
from siterecovery.store.context import ControlPlane, current
from siterecovery.store.events import record_event
from siterecovery.store.states import Severity
from siterecovery.store.tokens import Principal, TokenRefusal

PUBLIC = frozenset({"/api/ca", "/api/components/register"})
PRINCIPAL = "principal"  # the key in the request state

REFUSALS = {
    TokenRefusal.MISSING: "This API needs a bearer token.",
    TokenRefusal.UNKNOWN: "The bearer token is unknown.",
    TokenRefusal.REVOKED: "The bearer token has been revoked.",
    TokenRefusal.EXPIRED: "The bearer token has expired.",
}


def protected(path: str) -> bool:
    return path.startswith("/api/") and path.rstrip("/") not in PUBLIC


def too_large(limit: int) -> HTTPException:
    return HTTPException(413, f"The request body is larger than this server accepts ({limit} bytes).")


def identify(authorization: str | None, client: str) -> Principal | TokenRefusal:
    """The caller behind an Authorization header; a refusal of a presented token is recorded."""
    scheme, _, secret = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not secret.strip():
        return TokenRefusal.MISSING
    cp = current()
    with cp.db.session() as s:
        who = cp.tokens.check(s, secret.strip(), _epoch(cp))
        if not isinstance(who, Principal):
            record_event(
                s,
                Severity.WARNING,
                "token-invalid",
                f"A request from {client} used a token that is {who.value.removeprefix('token-')}.",
            )
    return who


def remembered(authorization: str | None) -> Principal | None:
    """The caller behind an Authorization header if the token cache holds it (no session, no thread)."""
    scheme, _, secret = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not secret.strip():
        return None
    cp = current()
    return cp.tokens.get(secret.strip(), _epoch(cp))


def _epoch(cp: ControlPlane) -> int | None:
    # The desired epoch the heartbeat writer read within the cache's time-to-live (None when it
    # read none: the time-to-live alone applies), see `store.desired_epoch`.
    engine = cp.db.engine
    url = _URLS.get(engine)
    if url is None:  # rendering a URL quotes each of its parts: once per engine, not per request
        url = _URLS[engine] = str(engine.url)
    return desired_epoch.recent(url, cp.tokens.ttl)


_URLS: WeakKeyDictionary[Engine, str] = WeakKeyDictionary()


class Edge:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        if protected(scope["path"]):
            client = scope["client"][0] if scope.get("client") else "?"
            authorization = headers.get("authorization")
            who: Principal | TokenRefusal | None = remembered(authorization)
            if who is None:
                who = await run_in_threadpool(identify, authorization, client)
            if not isinstance(who, Principal):
                refusal = Problem(who.value, REFUSALS[who], _SIGN_IN)
                response = problem_response(401, (refusal,), headers={"WWW-Authenticate": "Bearer"})
                await response(scope, receive, send)
                return
            scope.setdefault("state", {})[PRINCIPAL] = who
        limit = current().config.max_body_bytes
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            refusal = Problem("body-too-large", too_large(limit).detail, _SHRINK)
            await problem_response(413, (refusal,))(scope, receive, send)
            return
        received = 0

        async def counted() -> Message:
            # A body sent without (or under-stating) its length is counted as it arrives; the
            # route's body parsing turns this exception into the same 413.
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise too_large(limit)
            return message

        await self.app(scope, counted, send)


_SIGN_IN = "Send a valid bearer token: Authorization: Bearer <token> (`tokens create`)."
_SHRINK = "Send a smaller body, or raise the server's max_body_bytes setting."
