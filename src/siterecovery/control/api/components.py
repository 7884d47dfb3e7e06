"""Component registration (passphrase → certificate) and heartbeats; the `servers` view."""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import APIRouter, Depends, Request, Response
from sqlalchemy import select
from sqlalchemy.orm import Session, defer
from starlette.concurrency import run_in_threadpool

from siterecovery.control.api.deps import calling_component, control_plane, operator, reader, session
from siterecovery.control.heartbeat_writer import Recorded, writer_for
from siterecovery.control.heartbeats import server_view
from siterecovery.control.reports import validated_stats
from siterecovery.control.schemas import Heartbeat, HeartbeatReply, Registered, Registration, ServerOut
from siterecovery.control.throttle import THROTTLE
from siterecovery.dr.desired import Desired, cached_desired, desired_for, remember_desired
from siterecovery.dr.desired_bulk import cold_desired
from siterecovery.errors import Problem, SiteRecoveryError, Status, not_found
from siterecovery.store import certificates
from siterecovery.store.context import ControlPlane, current
from siterecovery.store.events import record_event
from siterecovery.store.models import Component, Token, by_id_or_name, new_id, now
from siterecovery.store.states import ComponentKind, Role, Severity
from siterecovery.store.tokens import Principal, create_token

router = APIRouter(prefix="/api", tags=["servers"])


@dataclass
class HeartbeatCounts:
    """How this process answered heartbeats since it started (`GET /api/cluster/self`)."""

    lean: int = 0  # answered by the lean path (`control.api.heartbeat_front`)
    full: int = 0  # handed to the full stack (first heartbeats, bad input, foreign tokens)
    token_loads: int = 0  # every component's token loaded after a miss (`control.api.warm`)
    desired_alone: int = 0  # desired states built for one component (not in a bulk build)
    # When the process could not answer at all (`server.pauses`): event-loop lag and collector
    # pauses of at least 50 ms, and the longest of each (and the generation that collection took:
    # 0 young objects only, 2 a full collection).
    loop_lags: int = 0
    loop_lag_max_ms: float = 0.0
    gc_pauses: int = 0
    gc_pause_max_ms: float = 0.0
    gc_pause_max_generation: int = -1


COUNTS = HeartbeatCounts()


@router.post("/components/register", status_code=201)
def register(
    body: Registration,
    request: Request,
    cp: ControlPlane = Depends(control_plane),
    s: Session = Depends(session, scope="function"),
) -> Registered:
    peer = request.client.host if request.client else "?"
    THROTTLE.check(peer, cp.config.passphrase_failures_per_minute)
    if not cp.check_passphrase(body.passphrase):
        # Recorded in its own transaction: the refusal below rolls this request's session back.
        with cp.db.session() as audit:
            THROTTLE.failed(audit, peer, cp.config.passphrase_failures_per_minute)
            record_event(
                audit,
                Severity.WARNING,
                "passphrase-invalid",
                f"{body.kind.value} {body.name!r} from {peer} gave a wrong registration passphrase.",
                "component",
                body.name,
            )
        raise SiteRecoveryError(
            Problem(
                "passphrase-invalid",
                f"The registration passphrase given by {body.name!r} is wrong.",
                "Run `siterecovery server passphrase` on the configuration server and use that value.",
            ),
            Status.FORBIDDEN,
        )
    THROTTLE.succeeded(s, peer)
    row = s.scalar(select(Component).where(Component.kind == body.kind, Component.name == body.name))
    if row is None:
        row = Component(id=new_id(body.kind.value.split("-")[0]), kind=body.kind, name=body.name)
        s.add(row)
    # A master target runs on a VM of the site; unless told otherwise it is the VM of its own name.
    machine = body.machine or (body.name if body.kind is ComponentKind.MASTER_TARGET else "")
    row.site, row.os_type, row.address, row.machine = body.site, body.os_type, body.address or "", machine
    row.registered_at = now()
    # One live token per component: re-registering revokes the previous one.
    for old in s.scalars(select(Token).where(Token.component_id == row.id)):
        old.revoked = True
    token = create_token(s, f"{body.kind.value}:{body.name}", Role.COMPONENT, component_id=row.id)
    issued = certificates.issue(cp, s, row)
    record_event(
        s,
        Severity.INFO,
        "component-registered",
        f"{body.kind.value} {body.name!r} registered.",
        "component",
        row.id,
    )
    return Registered(
        id=row.id,
        token=token,
        cert_pem=issued.cert_pem.decode(),
        key_pem=issued.key_pem.decode(),
        ca_pem=issued.ca_pem.decode(),
    )


@router.post("/components/{component_id}/heartbeat", response_model=HeartbeatReply)
async def heartbeat(
    component_id: str, body: Heartbeat, who: Principal = Depends(calling_component)
) -> Response:
    """A component's report; the answer is its desired state (when it changed) and the time.

    Most heartbeats never reach this function: `control.heartbeat_front` answers a well-formed
    one from a remembered token by calling `answer_heartbeat` itself. This route serves the rest
    (first heartbeats, bad input, foreign tokens) and documents the operation in the OpenAPI."""
    return _reply(await answer_heartbeat(current(), who, component_id, body))


async def answer_heartbeat(
    cp: ControlPlane, who: Principal, component_id: str, body: Heartbeat
) -> HeartbeatReply:
    """Record a validated heartbeat of `who` (a component's principal) and build the reply."""
    kind = _KINDS.get(component_id)
    if who.component_id != component_id or kind is None or kind != ComponentKind.AGENT:
        # One hop to a worker thread for the whole heartbeat: the usual sync dependencies
        # (control plane, principal, role check, session) would each hop to the thread pool and
        # back. Master targets' and process servers' reports (large, validated per pair) and a
        # component's first heartbeat take this way.
        return await run_in_threadpool(_heartbeat, cp, who, component_id, body)
    # An agent's small report is validated here and awaited on the event loop; a worker thread
    # is needed only when its desired state must be computed again.
    stats = validated_stats(kind, body.stats)  # a bad report is a 422, not stored
    recorded = await writer_for(cp.db, cp.config).record(component_id, kind, stats, body.address)
    desired = cached_desired(cp.db.url, component_id, recorded.epoch)
    if desired is None:
        desired = await run_in_threadpool(_desired, cp, component_id, recorded.epoch)
    return _answer(body, desired, recorded)


def _reply(reply: HeartbeatReply) -> Response:
    # Serialized once, by the model itself (`response_model` keeps the schema in the OpenAPI).
    return Response(reply_json(reply), media_type="application/json")


def reply_json(reply: HeartbeatReply) -> bytes:
    """The reply's body, as the route and the lean path send it."""
    return reply.__pydantic_serializer__.to_json(reply)


def _heartbeat(cp: ControlPlane, who: Principal, component_id: str, body: Heartbeat) -> HeartbeatReply:
    if who.component_id != component_id:
        raise SiteRecoveryError(
            Problem(
                "forbidden",
                "This token belongs to another component.",
                "Heartbeat with the component's own token.",
            ),
            Status.FORBIDDEN,
        )
    kind = _kind(cp, component_id)
    stats = validated_stats(kind, body.stats)  # a bad report is a 422, not stored
    # The report is written by the process's heartbeat writer, many per commit (group commit),
    # before this request touches the database: waiting for the writer while holding a pooled
    # connection would let the waiting requests starve the writer of connections.
    recorded = writer_for(cp.db, cp.config).write(component_id, kind, stats, body.address)
    # Nothing a desired state reads changed since this process computed it: reuse it.
    desired = cached_desired(cp.db.url, component_id, recorded.epoch)
    if desired is None:
        desired = _desired(cp, component_id, recorded.epoch)
    return _answer(body, desired, recorded)


def _desired(cp: ControlPlane, component_id: str, epoch: int) -> Desired:
    """Compute a component's desired state (after its report read `epoch`) and keep it."""
    built = cold_desired(cp.db, component_id, epoch)  # every component's at once, when due
    if built is not None:
        return built
    COUNTS.desired_alone += 1
    with cp.db.session() as s:
        # Without its statistics: the writer has stored them, and decoding them again here (a
        # master target's list every recovery point of every pair) would be most of the cost.
        row = s.get(Component, component_id, options=[defer(Component.stats)])
        if row is None:
            raise not_found("component", component_id)
        return remember_desired(cp.db.url, component_id, epoch, desired_for(s, row))


def _answer(body: Heartbeat, desired: Desired, recorded: Recorded) -> HeartbeatReply:
    found = recorded.points
    points = {} if found is None else {"points_seq": found.points_seq, "points_resync": found.resync}
    unchanged = body.desired_version == desired.version
    return HeartbeatReply(
        desired=None if unchanged else desired.state,
        desired_version=desired.version,
        server_time=now(),
        **points,
    )


_KINDS: dict[str, str] = {}  # component id -> kind; a component's kind never changes


def remember_kinds(kinds: dict[str, str]) -> None:
    """Components' kinds read elsewhere (every component's at once, `control.api.warm`)."""
    _KINDS.update(kinds)


def _kind(cp: ControlPlane, component_id: str) -> str:
    """The component's kind, read in a short session of its own (once per component)."""
    kind = _KINDS.get(component_id)
    if kind is None:
        with cp.db.session() as q:
            kind = q.scalar(select(Component.kind).where(Component.id == component_id))
        if kind is None:
            raise not_found("component", component_id)
        _KINDS[component_id] = kind
    return kind


@router.get("/servers")
def list_servers(
    _: Principal = Depends(reader),
    cp: ControlPlane = Depends(control_plane),
    s: Session = Depends(session, scope="function"),
) -> list[ServerOut]:
    rows = s.scalars(select(Component).order_by(Component.kind, Component.name))
    return [server_view(s, r, cp.config) for r in rows]


@router.get("/servers/{ident}")
def show_server(
    ident: str,
    _: Principal = Depends(reader),
    cp: ControlPlane = Depends(control_plane),
    s: Session = Depends(session, scope="function"),
) -> ServerOut:
    return server_view(s, find_component(s, ident), cp.config)


@router.post("/servers/{ident}/refresh")
def refresh_server(
    ident: str,
    _: Principal = Depends(operator),
    cp: ControlPlane = Depends(control_plane),
    s: Session = Depends(session, scope="function"),
) -> ServerOut:
    """Ask a component to re-discover now (e.g. a newly added retention volume, RP-RET)."""
    row = find_component(s, ident)
    row.desired = {**row.desired, "refresh": int(row.desired.get("refresh", 0)) + 1}
    return server_view(s, row, cp.config)


def find_component(s: Session, ident: str) -> Component:
    row = by_id_or_name(s, Component, ident)
    if row is None:
        raise not_found("server", ident)
    return row
