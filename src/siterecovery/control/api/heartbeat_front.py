"""The heartbeat's lean path: a well-formed heartbeat is answered without FastAPI's machinery.

Heartbeats are nearly all the server's requests (5,000 agents every 10 s, 100 process servers and
master targets every 5 s: ~520 per second), and an idle one does little: its token is in the
token cache, its report is small, its desired state is cached. Through the full stack it paid
~0.3 ms of CPU (a third of a millisecond on the bench box) to the layers around the work: the
edge middleware, exception middlewares, the router's match over every route, FastAPI's
dependency solving and body validation, the response object. This ASGI middleware answers such
a heartbeat itself — the token from the cache (`control.edges.remembered`), the body parsed as
FastAPI parses it (`json.loads`, then the `Heartbeat` model), the work done by the route's own
`answer_heartbeat` — and hands every other request to the application unchanged.

Exactly the same answers, by construction: anything this path does not answer itself goes to the
full stack, the body replayed, and gets whatever answer it got before — a token not remembered
(the first heartbeat, or one the edge must refuse with 401 and record), a token of another
component or role (403), a body that is not JSON or not a valid `Heartbeat` (422 with the
offending field), a body without Content-Length or over `max_body_bytes` (413), any other content
type. What this path sends itself: the reply, the same bytes and headers as the route's; a domain
error raised by the work (a bad statistic, 422; the writer not in time, 503) as the route's
exception handler sends it; any other exception propagates to the application's outermost
handler, which answers the usual 500 problem. The route stays, for the OpenAPI document and the
requests above. Admission (`control.admission`) sits outside this path: a shed heartbeat is
refused before its token is even looked up.
"""

from __future__ import annotations

import json
import re

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from siterecovery.control.api.components import COUNTS, answer_heartbeat, reply_json
from siterecovery.control.api.warm import Warmer
from siterecovery.control.edges import remembered
from siterecovery.control.problems import domain_response
from siterecovery.control.schemas import Heartbeat
from siterecovery.errors import SiteRecoveryError
from siterecovery.store.context import current
from siterecovery.store.states import Role

# The route's path, `{component_id}` matching as the router matches it (one segment).
ROUTE = re.compile(r"^/api/components/([^/]+)/heartbeat$")
_JSON = b"application/json"


class HeartbeatFront:
    """ASGI middleware: `POST /api/components/{id}/heartbeat` answered here when it can be."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.warmer = Warmer()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope.get("root_path"):
            await self.app(scope, receive, send)
            return
        match = ROUTE.match(scope["path"])
        if match is None:
            await self.app(scope, receive, send)
            return
        authorization, length = _eligible(scope)
        who = remembered(authorization) if length is not None else None
        if who is None and authorization and length is not None and await self.warmer.after_miss(current()):
            who = remembered(authorization)  # a component this process had not met yet
        if who is None or length is None or length > current().config.max_body_bytes:
            COUNTS.full += 1
            await self.app(scope, receive, send)  # the edge answers 401 or 413, or checks the token
            return
        body, messages = await _read(receive)
        if body is None:
            return  # the client went away before its body arrived: nobody to answer
        component_id = match.group(1)
        heartbeat = _parsed(body) if who.can(Role.COMPONENT) and who.component_id == component_id else None
        if heartbeat is None:
            COUNTS.full += 1
            await self.app(scope, _replay(messages, receive), send)
            return
        try:
            reply = await answer_heartbeat(current(), who, component_id, heartbeat)
        except SiteRecoveryError as exc:
            await domain_response(exc)(scope, receive, send)
            return
        content = reply_json(reply)
        headers = [(b"content-length", str(len(content)).encode()), (b"content-type", _JSON)]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": content})
        COUNTS.lean += 1


def _eligible(scope: Scope) -> tuple[str | None, int | None]:
    """The Authorization header, and the body's length if this path may read it: a Content-Length
    (no chunked body) and a JSON content type or none, as FastAPI then parses the body as JSON."""
    authorization: str | None = None
    length: int | None = None
    seen: set[bytes] = set()
    for name, value in scope["headers"]:
        if name in seen:  # a repeated header: the first counts, as `Headers.get` takes it
            continue
        seen.add(name)
        if name == b"authorization":
            authorization = value.decode("latin-1")
        elif name == b"content-length":
            if not value.isdigit():
                return None, None
            length = int(value)
        elif name == b"content-type":
            if value.split(b";", 1)[0].strip().lower() != _JSON:
                return None, None
        elif name == b"transfer-encoding":
            return None, None
    return authorization, length


async def _read(receive: Receive) -> tuple[bytes | None, list[Message]]:
    """The whole body (None if the client disconnected), and the messages it came in."""
    messages: list[Message] = []
    chunks: list[bytes] = []
    while True:
        message = await receive()
        messages.append(message)
        if message["type"] != "http.request":
            return None, messages
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            break
    body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
    return body, messages


def _parsed(body: bytes) -> Heartbeat | None:
    """The heartbeat if the body is one, exactly as FastAPI would take it; else None (the route
    then answers the 422 naming the field)."""
    try:
        # As FastAPI validates a body: `validate_python(..., from_attributes=True)` of the decoded JSON.
        return Heartbeat.model_validate(json.loads(body), from_attributes=True)
    except Exception:  # bad JSON, a bad field, nesting too deep (RecursionError): the route answers it
        return None


def _replay(messages: list[Message], receive: Receive) -> Receive:
    """A receive that gives the messages already read again, then the connection's own."""
    pending = list(messages)

    async def replayed() -> Message:
        if pending:
            return pending.pop(0)
        return await receive()

    return replayed
