"""The web portal of the configuration server: server-rendered pages at `/`.

Sign-in with an API token (kept in an HttpOnly cookie), then the overview, replicated items with
their valid actions, the Re-Protect dialog with its readiness check, jobs with live progress,
recovery plans and infrastructure. Pages are Jinja2 templates; the only script is a small
vanilla-JS file served from the package, so the portal needs no build step and no internet.
"""

from fastapi import APIRouter

from siterecovery.portal import forms, pages

router = APIRouter(include_in_schema=False)
router.include_router(pages.router)
router.include_router(forms.router)

__all__ = ["router"]
