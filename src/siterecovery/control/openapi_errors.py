"""Declares every error answer of every operation in /openapi.json, as the API sends it.

Errors are RFC 9457 `application/problem+json` bodies (control/problems.py), whatever refused
the request: the edge (401, 413), a role check (403), a lookup (404), a rule (409), validation
(422), a fabric that cannot be reached (503), malformed framing (400). FastAPI's generated
schema knows none of that (it declares a JSON 422 of its own shape), so the schema is completed
here once, at first request, and clients and contract tests can rely on it.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from siterecovery.control.edges import protected
from siterecovery.control.problems import MEDIA

_ITEM: dict[str, Any] = {
    "type": "object",
    "required": ["code", "message", "remediation"],
    "properties": {
        "code": {"type": "string", "description": "stable error code"},
        "message": {"type": "string"},
        "remediation": {"type": "string"},
        "rule": {"type": "string", "description": "requirement ID the refusal enforces"},
        "detail": {"type": "object", "description": "e.g. the field at fault"},
    },
}
_PROBLEM: dict[str, Any] = {
    "type": "object",
    "required": ["type", "title", "status", "code", "message", "remediation", "problems"],
    "properties": {
        "type": {"type": "string"},
        "title": {"type": "string"},
        "status": {"type": "integer"},
        **_ITEM["properties"],
        "problems": {"type": "array", "items": {"$ref": "#/components/schemas/ProblemItem"}},
    },
}
_WHY = {
    400: "The request could not be parsed.",
    401: "No valid bearer token (missing, unknown, revoked or expired).",
    403: "The token's role does not allow this.",
    404: "No such object.",
    409: "A rule refuses the operation in the current state.",
    413: "The request body is too large.",
    422: "The request is invalid; the problem names the field.",
    429: "Too many failed attempts from this address; retry after the Retry-After seconds.",
    503: "A fabric or component this operation needs cannot be reached.",
}
_EVERYWHERE = (400, 404, 409, 413, 422, 503)
RATE_LIMITED = frozenset({"/api/components/register"})


def _response(status: int) -> dict[str, Any]:
    return {
        "description": _WHY[status],
        "content": {MEDIA: {"schema": {"$ref": "#/components/schemas/Problem"}}},
    }


def complete(schema: dict[str, Any]) -> dict[str, Any]:
    """`schema` with the problem schemas and every operation's error responses added."""
    schemas = schema.setdefault("components", {}).setdefault("schemas", {})
    schemas["Problem"], schemas["ProblemItem"] = _PROBLEM, _ITEM
    for schema_name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(schema_name, None)
    for path, operations in schema.get("paths", {}).items():
        statuses = list(_EVERYWHERE)
        statuses += [401, 403] if protected(path) else []
        # Registration is public but refuses a wrong passphrase (403) and throttles guessing (429).
        statuses += [403, 429] if path in RATE_LIMITED else []
        for operation in operations.values():
            responses = operation.setdefault("responses", {})
            for status in sorted(statuses):
                responses[str(status)] = _response(status)
    return schema


def install(app: FastAPI) -> None:
    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = complete(
                get_openapi(
                    title=app.title, version=app.version, description=app.description, routes=app.routes
                )
            )
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
