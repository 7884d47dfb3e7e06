"""Fabrics (sites): connection with credentials encrypted at rest, discovery, machines."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Response
from pydantic import BaseModel, ValidationError
from sqlalchemy import select
from sqlalchemy.orm import Session

from siterecovery.control.api.deps import control_plane, operator, reader, session
from siterecovery.control.schemas import (
    AzureConnection,
    FabricCreate,
    FabricCredentials,
    FabricOut,
    LabConnection,
    LibvirtConnection,
    VSphereConnection,
)
from siterecovery.dr.fabric_access import discover, summary
from siterecovery.errors import conflict, invalid, not_found
from siterecovery.store.context import ControlPlane
from siterecovery.store.events import record_event
from siterecovery.store.models import Fabric, ReplicatedItem, by_id_or_name, new_id
from siterecovery.store.states import FabricKind, ProtectionState, Severity
from siterecovery.store.tokens import Principal

router = APIRouter(prefix="/api/fabrics", tags=["fabrics"])

_CONNECTIONS: dict[str, type[BaseModel]] = {
    "lab": LabConnection,
    "vsphere": VSphereConnection,
    "azure": AzureConnection,
    "libvirt": LibvirtConnection,
}
_SECRET_KEYS = ("password", "secret", "token")


def fabric_view(f: Fabric) -> FabricOut:
    return FabricOut(
        id=f.id,
        name=f.name,
        kind=f.kind,
        site=f.site,
        connection=f.connection,
        last_discovery_at=f.last_discovery_at,
        discovery_error=f.discovery_error,
        summary=summary(f),
    )


def find_fabric(s: Session, ident: str) -> Fabric:
    row = by_id_or_name(s, Fabric, ident)
    if row is None:
        raise not_found("fabric", ident)
    return row


def _check_connection(kind: str, connection: dict[str, Any]) -> None:
    """The connection must be a valid one of its kind's (strict types, bounds, no unknown keys)."""
    for key in connection:
        if key in _SECRET_KEYS:
            raise invalid(
                f"connection.{key}",
                "Secrets do not belong in the connection.",
                "Send the password as `secret`; it is stored encrypted.",
            )
    try:
        _CONNECTIONS[kind].model_validate(connection, strict=True)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = ".".join(["connection", *(str(p) for p in err["loc"])])
        raise invalid(
            field,
            f"Field '{field}': {err['msg']}.",
            f"Correct {field}; a {kind} fabric's connection is described in /openapi.json.",
        ) from None


@router.post("", status_code=201)
def add_fabric(
    body: FabricCreate,
    _: Principal = Depends(operator),
    cp: ControlPlane = Depends(control_plane),
    s: Session = Depends(session, scope="function"),
) -> FabricOut:
    if s.scalar(select(Fabric).where(Fabric.name == body.name)) is not None:
        raise conflict(
            "fabric-exists", f"A fabric named {body.name!r} already exists.", "Choose another name."
        )
    _check_connection(body.kind, body.connection)
    row = Fabric(
        id=new_id("fab"),
        name=body.name,
        kind=FabricKind(body.kind),
        site=body.site or body.name,
        connection=dict(body.connection),
        secret_encrypted=cp.box.seal(body.secret),
    )
    s.add(row)
    s.flush()
    discover(cp, row)
    record_event(
        s,
        Severity.INFO,
        "fabric-added",
        f"Fabric {row.name} ({row.kind}) added and discovered.",
        "fabric",
        row.id,
    )
    return fabric_view(row)


@router.get("")
def list_fabrics(
    _: Principal = Depends(reader), s: Session = Depends(session, scope="function")
) -> list[FabricOut]:
    return [fabric_view(f) for f in s.scalars(select(Fabric).order_by(Fabric.name))]


@router.get("/{ident}")
def show_fabric(
    ident: str, _: Principal = Depends(reader), s: Session = Depends(session, scope="function")
) -> FabricOut:
    return fabric_view(find_fabric(s, ident))


@router.post("/{ident}/discover")
def rediscover(
    ident: str,
    _: Principal = Depends(operator),
    cp: ControlPlane = Depends(control_plane),
    s: Session = Depends(session, scope="function"),
) -> FabricOut:
    row = find_fabric(s, ident)
    discover(cp, row)
    return fabric_view(row)


@router.put("/{ident}/credentials")
def update_credentials(
    ident: str,
    body: FabricCredentials,
    _: Principal = Depends(operator),
    cp: ControlPlane = Depends(control_plane),
    s: Session = Depends(session, scope="function"),
) -> FabricOut:
    """Replace the account (e.g. a read-only vCenter user, RP-DATASTORES) and discover again."""
    row = find_fabric(s, ident)
    if body.connection is not None:
        _check_connection(row.kind, body.connection)
        row.connection = dict(body.connection)
    row.secret_encrypted = cp.box.seal(body.secret)
    discover(cp, row)
    record_event(
        s,
        Severity.INFO,
        "fabric-credentials-updated",
        f"Credentials of fabric {row.name} updated.",
        "fabric",
        row.id,
    )
    return fabric_view(row)


@router.delete("/{ident}", status_code=204, response_class=Response)
def remove_fabric(
    ident: str, _: Principal = Depends(operator), s: Session = Depends(session, scope="function")
) -> Response:
    """Forget a site and its stored credentials; refused while a protected item's machine lives there."""
    row = find_fabric(s, ident)
    users = sorted(
        item.name
        for item in s.scalars(select(ReplicatedItem))
        if item.state != ProtectionState.DISABLED
        and row.id
        in (
            item.source_fabric_id,
            item.target_fabric_id,
            item.details.get("onprem_fabric"),
            item.details.get("cloud_fabric"),
        )
    )
    if users:
        raise conflict(
            "fabric-in-use",
            f"Fabric {row.name} is a site of replicated items {', '.join(users)}.",
            "Disable protection of those items (items disable), or reprotect them to another site, then "
            "remove the fabric.",
        )
    s.delete(row)
    record_event(s, Severity.INFO, "fabric-removed", f"Fabric {row.name} removed.", "fabric", row.id)
    return Response(status_code=204)


@router.get("/{ident}/machines")
def list_machines(
    ident: str, _: Principal = Depends(reader), s: Session = Depends(session, scope="function")
) -> list[dict[str, Any]]:
    row = find_fabric(s, ident)
    return list(row.inventory.get("machines", []))
