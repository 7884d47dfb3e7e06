"""The configuration server itself: identity, registration passphrase, CA certificate, tokens."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends
from fastapi.responses import PlainTextResponse
from sqlalchemy import select
from sqlalchemy.orm import Session

from siterecovery import __version__
from siterecovery.control.api.deps import admin, control_plane, reader, session
from siterecovery.control.auth import Principal, create_token
from siterecovery.control.context import ControlPlane
from siterecovery.control.db import ServerIdentity, Token, now
from siterecovery.control.events import record_event
from siterecovery.control.schemas import TokenCreate, TokenCreated
from siterecovery.control.states import Role, Severity

router = APIRouter(prefix="/api", tags=["server"])


@router.get("/server")
def server_info(
    _: Principal = Depends(reader), s: Session = Depends(session, scope="function")
) -> dict[str, Any]:
    ident = s.scalar(select(ServerIdentity))
    assert ident is not None
    return {
        "id": ident.id,
        "name": ident.name,
        "advertised_address": ident.advertised_address,
        "version": __version__,
        "time": now(),
    }


@router.get("/ca", response_class=PlainTextResponse)
def ca_certificate(cp: ControlPlane = Depends(control_plane)) -> str:
    """The CA certificate is public: components use it to verify the server and each other."""
    return cp.ca.cert_pem.decode()


@router.get("/server/passphrase")
def show_passphrase(
    _: Principal = Depends(admin), cp: ControlPlane = Depends(control_plane)
) -> dict[str, str]:
    return {"passphrase": cp.passphrase()}


@router.post("/server/passphrase/rotate")
def rotate_passphrase(
    who: Principal = Depends(admin),
    cp: ControlPlane = Depends(control_plane),
    s: Session = Depends(session, scope="function"),
) -> dict[str, str]:
    value = cp.rotate_passphrase()
    record_event(s, Severity.INFO, "passphrase-rotated", f"Registration passphrase rotated by {who.name}.")
    return {"passphrase": value}


@router.post("/tokens", status_code=201)
def new_token(
    body: TokenCreate, _: Principal = Depends(admin), s: Session = Depends(session, scope="function")
) -> TokenCreated:
    secret = create_token(s, body.name, Role(body.role))
    row = s.scalar(select(Token).order_by(Token.created_at.desc()).where(Token.name == body.name))
    assert row is not None
    return TokenCreated(id=row.id, name=row.name, role=Role(row.role), token=secret)


@router.get("/tokens")
def list_tokens(
    _: Principal = Depends(admin), s: Session = Depends(session, scope="function")
) -> list[dict[str, Any]]:
    rows = s.scalars(select(Token).where(Token.role != Role.COMPONENT.value).order_by(Token.created_at))
    return [
        {"id": t.id, "name": t.name, "role": t.role, "created_at": t.created_at, "revoked": t.revoked}
        for t in rows
    ]
