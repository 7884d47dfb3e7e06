"""The configuration server itself: identity, registration passphrase, CA certificate, tokens."""

from __future__ import annotations

from fastapi import APIRouter, Depends
from fastapi.responses import PlainTextResponse
from sqlalchemy import select
from sqlalchemy.orm import Session

from siterecovery import __version__
from siterecovery.control.api.deps import admin, control_plane, reader, session
from siterecovery.control.schemas import ServerInfo, TokenCreate, TokenCreated, TokenOut
from siterecovery.errors import conflict, not_found
from siterecovery.store.context import ControlPlane
from siterecovery.store.events import record_event
from siterecovery.store.models import ServerIdentity, Token, now
from siterecovery.store.states import Role, Severity
from siterecovery.store.tokens import Principal, create_token, hash_secret

router = APIRouter(prefix="/api", tags=["server"])


@router.get("/server")
def server_info(
    _: Principal = Depends(reader), s: Session = Depends(session, scope="function")
) -> ServerInfo:
    ident = s.scalar(select(ServerIdentity))
    assert ident is not None
    return ServerInfo(
        id=ident.id,
        name=ident.name,
        advertised_address=ident.advertised_address,
        version=__version__,
        time=now(),
    )


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
    body: TokenCreate,
    who: Principal = Depends(admin),
    cp: ControlPlane = Depends(control_plane),
    s: Session = Depends(session, scope="function"),
) -> TokenCreated:
    lifetime = body.expires_in_seconds or cp.config.token_days * 86400
    expires_at = now() + lifetime
    secret = create_token(s, body.name, Role(body.role), expires_at=expires_at)
    row = s.scalar(select(Token).where(Token.secret_hash == hash_secret(secret)))
    assert row is not None
    record_event(
        s, Severity.INFO, "token-created", f"{body.role.value} token {row.name!r} created by {who.name}."
    )
    return TokenCreated(id=row.id, name=row.name, role=row.role, token=secret, expires_at=expires_at)


def token_view(t: Token) -> TokenOut:
    expired = t.expires_at is not None and t.expires_at <= now()
    return TokenOut(
        id=t.id,
        name=t.name,
        role=t.role,
        created_at=t.created_at,
        expires_at=t.expires_at,
        revoked=t.revoked,
        expired=expired,
    )


@router.get("/tokens")
def list_tokens(
    _: Principal = Depends(admin), s: Session = Depends(session, scope="function")
) -> list[TokenOut]:
    """User tokens (component tokens are managed by registration), revoked and expired included."""
    rows = s.scalars(select(Token).where(Token.role != Role.COMPONENT).order_by(Token.created_at))
    return [token_view(t) for t in rows]


@router.post("/tokens/{token_id}/revoke")
def revoke_token(
    token_id: str, who: Principal = Depends(admin), s: Session = Depends(session, scope="function")
) -> TokenOut:
    """Refused from the next request on; revoking twice is harmless."""
    row = s.get(Token, token_id)
    if row is None or row.role == Role.COMPONENT:
        raise not_found("token", token_id)
    if row.id == who.token_id:
        raise conflict(
            "token-in-use",
            "A token cannot revoke itself: this request would lock its caller out.",
            "Revoke it with another admin token.",
        )
    if not row.revoked:
        row.revoked = True
        record_event(
            s, Severity.INFO, "token-revoked", f"Token {row.name!r} ({row.id}) revoked by {who.name}."
        )
    return token_view(row)
