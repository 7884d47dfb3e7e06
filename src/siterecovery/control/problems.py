"""Turns errors into RFC 9457 `application/problem+json` responses, at the API boundary only.

Domain errors keep their stable code, message and remediation; request validation errors name
the field at fault; anything unexpected is a 500 that shows no internals (it is logged).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from siterecovery.errors import Problem, SiteRecoveryError

log = logging.getLogger("siterecovery.api")
MEDIA = "application/problem+json"


def problem_response(
    status: int, problems: tuple[Problem, ...], title: str = "", headers: Mapping[str, str] | None = None
) -> JSONResponse:
    first = problems[0]
    body: dict[str, Any] = {
        "type": f"https://siterecovery.dev/problems/{first.code}",
        "title": title or first.message,
        "status": status,
        **first.as_dict(),
        "problems": [p.as_dict() for p in problems],
    }
    return JSONResponse(body, status_code=status, media_type=MEDIA, headers=headers)


def domain_response(exc: SiteRecoveryError) -> JSONResponse:
    """A domain error's answer (also sent by the heartbeat's lean path, `control.heartbeat_front`)."""
    return problem_response(int(exc.status), exc.problems)


_HTTP_CODES = {
    400: ("body-unparseable", "Send a well-formed JSON body (see /openapi.json)."),
    401: ("unauthenticated", "Send a bearer token: Authorization: Bearer <token>."),
    403: ("forbidden", "Use a token whose role allows this operation."),
    404: ("not-found", "Check the URL against /openapi.json."),
    405: ("method-not-allowed", "Use one of the methods in the Allow header (see /openapi.json)."),
    429: ("too-many-attempts", "Wait for the Retry-After seconds, and check the credentials you send."),
    413: ("body-too-large", "Send a smaller body, or raise the server's max_body_bytes setting."),
}


_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")


def allowed_methods(app: FastAPI, request: Request) -> list[str]:
    """Every method some route serves at this path (Starlette's own 405 names only the first)."""
    return [
        method
        for method in _METHODS
        if any(route.matches({**request.scope, "method": method})[0] is Match.FULL for route in app.routes)
    ]


def install(app: FastAPI) -> None:
    @app.exception_handler(SiteRecoveryError)
    async def _domain(_: Request, exc: SiteRecoveryError) -> JSONResponse:
        return domain_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        problems = []
        for err in exc.errors():
            # A JSON syntax error's location is a character offset, not a field: blame the body.
            loc = (
                []
                if err.get("type") == "json_invalid"
                else [str(p) for p in err.get("loc", ()) if p != "body"]
            )
            field = ".".join(loc) or "body"
            problems.append(
                Problem(
                    code="invalid-input",
                    message=f"Field '{field}': {err.get('msg', 'invalid value')}.",
                    remediation="Correct the field and send the request again (see /openapi.json).",
                    detail={"field": field},
                )
            )
        if not problems:
            problems.append(Problem("invalid-input", "The request is invalid.", "Check the request body."))
        return problem_response(422, tuple(problems), "The request is invalid.")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code, remediation = _HTTP_CODES.get(exc.status_code, ("http-error", "Check the request."))
        message = exc.detail if isinstance(exc.detail, str) else "Request refused."
        # Headers carry meaning here: Allow on a 405, WWW-Authenticate on a 401, Retry-After on a 429.
        headers = dict(exc.headers or {})
        if exc.status_code == 405:
            headers["Allow"] = ", ".join(allowed_methods(app, request))
        return problem_response(exc.status_code, (Problem(code, message, remediation),), headers=headers)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error", exc_info=exc)
        return problem_response(
            500,
            (
                Problem(
                    "internal-error",
                    "The server failed to handle the request.",
                    "Retry; if it persists, collect the server log and report it.",
                ),
            ),
        )
