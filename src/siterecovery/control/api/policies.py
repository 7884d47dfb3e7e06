"""Replication policies; creating one creates its immutable failback policy (POL-1)."""

from __future__ import annotations

from fastapi import APIRouter, Depends
from sqlalchemy import select
from sqlalchemy.orm import Session

from siterecovery.control.api.deps import control_plane, operator, reader, session
from siterecovery.control.schemas import PolicyCreate, PolicyOut, PolicyUpdate
from siterecovery.errors import conflict, not_found
from siterecovery.store.context import ControlPlane
from siterecovery.store.events import record_event
from siterecovery.store.models import Policy, by_id_or_name, new_id
from siterecovery.store.states import PolicyKind, Severity
from siterecovery.store.tokens import Principal

router = APIRouter(prefix="/api/policies", tags=["policies"])

# POL-1: the failback policy's fixed values.
FAILBACK_RPO_SECONDS = 15 * 60
FAILBACK_RETENTION_SECONDS = 24 * 3600
FAILBACK_APP_FREQUENCY_SECONDS = 60 * 60


def policy_view(p: Policy) -> PolicyOut:
    return PolicyOut(
        id=p.id,
        name=p.name,
        kind=p.kind,
        rpo_threshold_minutes=p.rpo_threshold_seconds / 60,
        retention_hours=p.retention_seconds / 3600,
        app_consistent_frequency_minutes=p.app_consistent_frequency_seconds / 60,
        crash_consistent_frequency_seconds=p.crash_consistent_frequency_seconds,
        editable=p.editable,
        failback_policy_id=p.failback_policy_id,
        forward_policy_id=p.forward_policy_id,
        associated_server_id=p.associated_server_id,
    )


def find_policy(s: Session, ident: str) -> Policy:
    row = by_id_or_name(s, Policy, ident)
    if row is None:
        raise not_found("policy", ident)
    return row


@router.post("", status_code=201)
def create_policy(
    body: PolicyCreate,
    _: Principal = Depends(operator),
    cp: ControlPlane = Depends(control_plane),
    s: Session = Depends(session, scope="function"),
) -> PolicyOut:
    failback_name = f"{body.name}-failback"
    for name in (body.name, failback_name):
        if s.scalar(select(Policy).where(Policy.name == name)) is not None:
            raise conflict(
                "policy-exists", f"A policy named {name!r} already exists.", "Choose another name."
            )
    forward = Policy(
        id=new_id("pol"),
        name=body.name,
        kind=PolicyKind.REPLICATION,
        rpo_threshold_seconds=body.rpo_threshold_minutes * 60,
        retention_seconds=body.retention_hours * 3600,
        app_consistent_frequency_seconds=body.app_consistent_frequency_minutes * 60,
        crash_consistent_frequency_seconds=body.crash_consistent_frequency_seconds,
        editable=True,
    )
    failback = Policy(
        id=new_id("pol"),
        name=failback_name,
        kind=PolicyKind.FAILBACK,
        rpo_threshold_seconds=FAILBACK_RPO_SECONDS,
        retention_seconds=FAILBACK_RETENTION_SECONDS,
        app_consistent_frequency_seconds=FAILBACK_APP_FREQUENCY_SECONDS,
        crash_consistent_frequency_seconds=body.crash_consistent_frequency_seconds,
        editable=False,
        forward_policy_id=forward.id,
        associated_server_id=cp.server_id,
    )
    forward.failback_policy_id = failback.id
    s.add_all([forward, failback])
    record_event(
        s,
        Severity.INFO,
        "policy-created",
        f"Policy {forward.name} created with its failback policy {failback.name}.",
        "policy",
        forward.id,
    )
    return policy_view(forward)


@router.get("")
def list_policies(
    _: Principal = Depends(reader), s: Session = Depends(session, scope="function")
) -> list[PolicyOut]:
    return [policy_view(p) for p in s.scalars(select(Policy).order_by(Policy.created_at, Policy.kind.desc()))]


@router.get("/{ident}")
def show_policy(
    ident: str, _: Principal = Depends(reader), s: Session = Depends(session, scope="function")
) -> PolicyOut:
    return policy_view(find_policy(s, ident))


@router.patch("/{ident}")
def update_policy(
    ident: str,
    body: PolicyUpdate,
    _: Principal = Depends(operator),
    s: Session = Depends(session, scope="function"),
) -> PolicyOut:
    p = find_policy(s, ident)
    if not p.editable:
        raise conflict(
            "policy-immutable",
            f"Policy {p.name} is a failback policy and cannot be edited.",
            "Failback policies are fixed (RPO 15 min, retention 24 h, app-consistent 60 min); "
            "edit the forward replication policy instead.",
            rule="POL-1",
        )
    if body.rpo_threshold_minutes is not None:
        p.rpo_threshold_seconds = body.rpo_threshold_minutes * 60
    if body.retention_hours is not None:
        p.retention_seconds = body.retention_hours * 3600
    if body.app_consistent_frequency_minutes is not None:
        p.app_consistent_frequency_seconds = body.app_consistent_frequency_minutes * 60
    if body.crash_consistent_frequency_seconds is not None:
        p.crash_consistent_frequency_seconds = body.crash_consistent_frequency_seconds
    return policy_view(p)
