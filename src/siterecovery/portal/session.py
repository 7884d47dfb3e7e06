"""Who is signed in to the portal, and whether a form really came from the portal.

The portal keeps the caller's API token in an HttpOnly, SameSite=Strict cookie, so scripts on a
page cannot read it and other sites cannot send it. Each request checks the token again against
the tokens table (a revoked token ends the session at once) and the role rules are the API's own
(`Principal.can`). Every form carries a CSRF token derived from the session's secret with HMAC:
it is stable for the session, differs per session, and cannot be computed without the cookie.
"""

from __future__ import annotations

import hashlib
import hmac
from urllib.parse import parse_qsl

from fastapi import Request
from fastapi.responses import RedirectResponse

from siterecovery.store.context import current
from siterecovery.store.tokens import Principal, authenticate

COOKIE = "siterecovery_session"
_CSRF_CONTEXT = b"siterecovery portal csrf v1"
_MAX_FORM_BYTES = 64 * 1024


def session_secret(request: Request) -> str:
    return request.cookies.get(COOKIE, "")


def check_token(secret: str) -> Principal | None:
    """The principal behind an API token, or None; component tokens cannot use the portal."""
    if not secret:
        return None
    with current().db.session() as s:
        who = authenticate(s, secret)
    if who is None or who.component_id is not None:
        return None
    return who


def signed_in(request: Request) -> Principal | None:
    """Dependency: the signed-in principal, or None (the page then redirects to sign-in)."""
    return check_token(session_secret(request))


def csrf_token(secret: str) -> str:
    return hmac.new(secret.encode(), _CSRF_CONTEXT, hashlib.sha256).hexdigest()


def csrf_ok(request: Request, form: dict[str, str]) -> bool:
    secret = session_secret(request)
    return bool(secret) and hmac.compare_digest(form.get("csrf", ""), csrf_token(secret))


async def form_fields(request: Request) -> dict[str, str]:
    """Dependency: a urlencoded form body as a dict (the last value wins for repeated names)."""
    body = await request.body()
    if len(body) > _MAX_FORM_BYTES:
        return {}
    return dict(parse_qsl(body.decode("utf-8", errors="replace"), keep_blank_values=True))


def to_signin(request: Request) -> RedirectResponse:
    target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    return RedirectResponse(f"/signin?next={safe_next(target)}", status_code=303)


def safe_next(target: str) -> str:
    # Only local paths: an open redirect would let a link send the user anywhere after sign-in.
    return target if target.startswith("/") and not target.startswith("//") else "/"


def sign_in_response(request: Request, secret: str, target: str) -> RedirectResponse:
    response = RedirectResponse(safe_next(target), status_code=303)
    response.set_cookie(
        COOKIE,
        secret,
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
        path="/",
    )
    return response


def sign_out_response() -> RedirectResponse:
    response = RedirectResponse("/signin", status_code=303)
    response.delete_cookie(COOKIE, path="/", httponly=True, samesite="strict")
    return response
