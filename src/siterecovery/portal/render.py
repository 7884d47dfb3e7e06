"""Jinja2 rendering of portal pages: the environment, display filters and the page helper.

Templates are autoescaped HTML in `templates/`; every page extends `base.html`, which gets the
signed-in principal, the CSRF token for its forms and whether action buttons may be shown.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from fastapi import Request
from fastapi.responses import HTMLResponse
from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape
from pydantic import ValidationError

from siterecovery import __version__
from siterecovery.errors import Problem, SiteRecoveryError
from siterecovery.portal.session import csrf_token, session_secret
from siterecovery.store.states import Direction, Role
from siterecovery.store.tokens import Principal

_UNITS = ("B", "KiB", "MiB", "GiB", "TiB")


def human_bytes(n: float | None) -> str:
    if n is None:
        return "—"
    value = float(n)
    for unit in _UNITS:
        if abs(value) < 1024 or unit == _UNITS[-1]:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    s = max(0.0, float(seconds))
    if s < 60:
        return f"{s:.0f} s"
    if s < 3600:
        return f"{s / 60:.0f} min"
    if s < 86400:
        return f"{s / 3600:.1f} h"
    return f"{s / 86400:.1f} d"


def ago(epoch: float | None) -> str:
    return "never" if epoch is None else f"{duration(time.time() - epoch)} ago"


def timestamp(epoch: float | None) -> str:
    return "—" if epoch is None else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(epoch))


def label(value: str) -> str:
    """`failover-committed` → `Failover committed`."""
    text = value.replace("-", " ").replace("_", " ")
    return text[:1].upper() + text[1:]


def direction_label(value: str) -> str:
    return "Cloud → On-premises" if value == Direction.FAILBACK else "On-premises → Cloud"


_env = Environment(
    loader=PackageLoader("siterecovery.portal", "templates"),
    autoescape=select_autoescape(["html"]),
    undefined=StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)
_env.filters.update(
    bytes=human_bytes, duration=duration, ago=ago, timestamp=timestamp, label=label, direction=direction_label
)


def page(
    request: Request, who: Principal | None, template: str, status: int = 200, **context: Any
) -> HTMLResponse:
    secret = session_secret(request)
    html = _env.get_template(template).render(
        who=who,
        can_operate=who is not None and who.can(Role.OPERATOR),
        csrf=csrf_token(secret) if secret else "",
        path=request.url.path,
        version=__version__,
        **context,
    )
    return HTMLResponse(html, status_code=status, headers={"Cache-Control": "no-store"})


def problems_of(exc: SiteRecoveryError | ValidationError) -> list[Problem]:
    """Code, message and remediation of each problem, as the problem list template shows them."""
    if isinstance(exc, SiteRecoveryError):
        return list(exc.problems)
    return [
        Problem(
            "invalid-input",
            f"Field '{'.'.join(str(x) for x in err['loc']) or 'form'}': {err['msg']}.",
            "Correct the field and submit again.",
        )
        for err in exc.errors()
    ]


def refused(
    request: Request, who: Principal | None, problems: Sequence[Problem], status: int
) -> HTMLResponse:
    return page(request, who, "refused.html", status=status, problems=problems)


def forbidden(request: Request, who: Principal) -> HTMLResponse:
    problem = Problem(
        "forbidden",
        f"Role {who.role.value} may not do this; it needs operator.",
        "Sign in with a token whose role allows this operation.",
    )
    return refused(request, who, [problem], 403)
