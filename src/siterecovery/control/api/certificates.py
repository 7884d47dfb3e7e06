"""Component certificates over the API: renewal by the component, removal of a component.

`POST /api/components/{id}/certificate` renews the caller's certificate (its token, plus its
current certificate and a CSR signed by the same key: see `store/certificates.py`).
`DELETE /api/servers/{ident}` removes a component: its certificates and tokens are revoked at once
and every hop refuses it from its next desired state (`siterecovery servers remove`).
"""

from __future__ import annotations

from fastapi import APIRouter, Depends
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import select
from sqlalchemy.orm import Session

from siterecovery.control.api.components import find_component
from siterecovery.control.api.deps import admin, component, control_plane, session
from siterecovery.dr.desired import agent_name
from siterecovery.errors import Problem, SiteRecoveryError, Status, not_found
from siterecovery.store import certificates, points
from siterecovery.store.context import ControlPlane
from siterecovery.store.events import record_event
from siterecovery.store.models import Component, ReplicatedItem
from siterecovery.store.record import ItemRecord
from siterecovery.store.states import ComponentKind, Severity
from siterecovery.store.tokens import Principal

router = APIRouter(prefix="/api", tags=["servers"])


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RenewRequest(_Body):
    cert_pem: str = Field(max_length=16384, description="the component's current certificate")
    csr_pem: str = Field(max_length=16384, description="a CSR signed by the key of that certificate")


class RenewReply(_Body):
    cert_pem: str


class Removed(_Body):
    id: str
    name: str
    kind: ComponentKind
    revoked: list[str] = Field(description="certificate serials revoked (hex)")


@router.post("/components/{component_id}/certificate")
def renew_certificate(
    component_id: str,
    body: RenewRequest,
    who: Principal = Depends(component),
    cp: ControlPlane = Depends(control_plane),
    s: Session = Depends(session, scope="function"),
) -> RenewReply:
    if who.component_id != component_id:
        raise SiteRecoveryError(
            Problem("forbidden", "This token belongs to another component.", "Renew with its own token."),
            Status.FORBIDDEN,
        )
    row = s.get(Component, component_id)
    if row is None:
        raise not_found("component", component_id)
    return RenewReply(cert_pem=certificates.renew(cp, s, row, body.cert_pem, body.csr_pem).decode())


def _users(s: Session, row: Component) -> list[str]:
    """Items whose replication (or held failover) goes through this component."""
    names = set()
    for item in s.scalars(select(ReplicatedItem)):
        rec = ItemRecord.model_validate(item.details)
        for rep in (rec.replication, rec.held.replication if rec.held is not None else None):
            if rep is None:
                continue
            agent = agent_name(rep.source_site.value, rep.source_machine)
            if row.id in (rep.process_server, rep.master_target) or row.name == agent:
                names.add(item.name)
    return sorted(names)


@router.delete("/servers/{ident}")
def remove_server(
    ident: str,
    force: bool = False,
    _: Principal = Depends(admin),
    s: Session = Depends(session, scope="function"),
) -> Removed:
    """Remove a component: revoke its certificates and tokens; every hop refuses it from then on."""
    row = find_component(s, ident)
    if row.kind == ComponentKind.CONFIGURATION:
        raise SiteRecoveryError(
            Problem(
                "server-not-removable",
                "The configuration server cannot remove itself.",
                "Remove process servers, master targets or agents.",
            ),
            Status.CONFLICT,
        )
    users = _users(s, row)
    if users and not force:
        raise SiteRecoveryError(
            Problem(
                "server-in-use",
                f"{row.kind} {row.name!r} replicates {', '.join(users)}.",
                "Disable or move their replication first, or remove it anyway with --force "
                "(e.g. a compromised component): their replication stops until it is reassigned.",
            ),
            Status.CONFLICT,
        )
    revoked = certificates.revoke_component(s, row)
    record_event(
        s,
        Severity.WARNING,
        "component-removed",
        f"{row.kind} {row.name!r} was removed; {len(revoked)} certificate(s) revoked"
        + (f" while it replicated {', '.join(users)}." if users else "."),
        "component",
        row.id,
    )
    out = Removed(id=row.id, name=row.name, kind=row.kind, revoked=revoked)
    points.forget(s, row.id)
    s.delete(row)
    return out
