"""The portal's read-only pages: sign-in, overview, replicated items, jobs, plans, infrastructure.

Each page checks the session cookie (no session: redirect to sign-in), reads the database
through the API's view functions and renders a template. The job page's progress bars are kept
current by `static/portal.js`, which polls `/portal/api/jobs/{id}` with the same cookie.
"""

from __future__ import annotations

import re
from importlib import resources

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from sqlalchemy import select

from siterecovery.control.api import items as items_api
from siterecovery.control.api import jobs as jobs_api
from siterecovery.control.api.fabrics import list_fabrics
from siterecovery.control.api.server import server_info
from siterecovery.errors import SiteRecoveryError
from siterecovery.portal.plans_view import plan_choices, plan_rows
from siterecovery.portal.render import page, problems_of, refused
from siterecovery.portal.session import check_token, safe_next, sign_in_response, signed_in, to_signin
from siterecovery.portal.session import form_fields as form_dep
from siterecovery.portal.views import PAGE_SIZE, infrastructure, item_rows, overview
from siterecovery.store.context import current
from siterecovery.store.models import Job, ReplicatedItem
from siterecovery.store.states import JobState
from siterecovery.store.tokens import Principal

router = APIRouter(include_in_schema=False)

_STATIC_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]*\.(css|js|svg)$")
_MEDIA = {"css": "text/css", "js": "text/javascript", "svg": "image/svg+xml"}


@router.get("/portal/static/{name}")
def static_file(name: str) -> Response:
    """Every asset is served from the package: the portal works with no internet access."""
    match = _STATIC_NAME.match(name)
    path = resources.files("siterecovery.portal") / "static" / name
    if match is None or not path.is_file():
        return Response("not found", status_code=404, media_type="text/plain")
    return Response(
        path.read_bytes(), media_type=_MEDIA[match.group(1)], headers={"Cache-Control": "max-age=300"}
    )


@router.get("/signin")
def signin_page(request: Request, next: str = "/") -> Response:
    return page(request, None, "signin.html", next=safe_next(next), error="")


@router.post("/signin")
def signin(request: Request, form: dict[str, str] = Depends(form_dep)) -> Response:
    secret = form.get("token", "").strip()
    target = safe_next(form.get("next", "/"))
    if check_token(secret) is None:
        return page(
            request,
            None,
            "signin.html",
            status=401,
            next=target,
            error="The token is unknown or revoked, or it has expired. "
            "Create one with `siterecovery tokens create`.",
        )
    return sign_in_response(request, secret, target)


@router.get("/")
def overview_page(request: Request, who: Principal | None = Depends(signed_in)) -> Response:
    if who is None:
        return to_signin(request)
    with current().db.session() as s:
        return page(request, who, "overview.html", view=overview(s, who))


@router.get("/items")
def items_page(request: Request, after: str = "", who: Principal | None = Depends(signed_in)) -> Response:
    if who is None:
        return to_signin(request)
    with current().db.session() as s:
        rows = item_rows(s, after=after[:200] or None, limit=PAGE_SIZE + 1)
        more = rows[PAGE_SIZE - 1].item.name if len(rows) > PAGE_SIZE else ""
        return page(request, who, "items.html", rows=rows[:PAGE_SIZE], next_after=more, paged=bool(after))


@router.get("/items/{ident}")
def item_page(ident: str, request: Request, who: Principal | None = Depends(signed_in)) -> Response:
    if who is None:
        return to_signin(request)
    try:
        with current().db.session() as s:
            row = items_api.find_item(s, ident)
            found = item_rows(s, ids=[row.id])[0]
            jobs = [jobs_api.job_view(s, j) for j in jobs_api.find_jobs(s, None, None, row.id, 20)]
            return page(request, who, "item.html", row=found, jobs=jobs)
    except SiteRecoveryError as exc:
        return refused(request, who, problems_of(exc), int(exc.status))


@router.get("/jobs")
def jobs_page(
    request: Request,
    state: str = "",
    kind: str = "",
    target: str = "",
    who: Principal | None = Depends(signed_in),
) -> Response:
    if who is None:
        return to_signin(request)
    wanted = JobState(state) if state in {s.value for s in JobState} else None
    with current().db.session() as s:
        found = jobs_api.find_jobs(s, wanted, kind[:50] or None, target[:200] or None, 200)
        jobs = [jobs_api.job_view(s, j) for j in found]
        kinds = sorted(set(s.scalars(select(Job.kind).distinct())))
        return page(
            request,
            who,
            "jobs.html",
            jobs=jobs,
            kinds=kinds,
            states=[x.value for x in JobState],
            filters={"state": wanted.value if wanted else "", "kind": kind, "target": target},
        )


@router.get("/jobs/{job_id}")
def job_page(job_id: str, request: Request, who: Principal | None = Depends(signed_in)) -> Response:
    if who is None:
        return to_signin(request)
    try:
        with current().db.session() as s:
            job = jobs_api.show_job(job_id, who, s)
            item_id = job.target_id if job.target_type == "replicatedItem" else ""
            has_item = bool(item_id) and s.get(ReplicatedItem, item_id) is not None
            return page(request, who, "job.html", job=job, item_link=item_id if has_item else "")
    except SiteRecoveryError as exc:
        return refused(request, who, problems_of(exc), int(exc.status))


@router.get("/portal/api/jobs/{job_id}")
def job_json(job_id: str, who: Principal | None = Depends(signed_in)) -> Response:
    """The job as the REST API shows it, authenticated by the portal's session cookie."""
    if who is None:
        return JSONResponse({"code": "unauthenticated"}, status_code=401)
    try:
        with current().db.session() as s:
            return JSONResponse(jobs_api.show_job(job_id, who, s).model_dump(mode="json"))
    except SiteRecoveryError as exc:
        return JSONResponse(exc.first.as_dict(), status_code=int(exc.status))


@router.get("/plans")
def plans_page(request: Request, who: Principal | None = Depends(signed_in)) -> Response:
    if who is None:
        return to_signin(request)
    with current().db.session() as s:
        return page(request, who, "plans.html", plans=plan_rows(s), choices=plan_choices(s, current().config))


@router.get("/infrastructure")
def infrastructure_page(request: Request, who: Principal | None = Depends(signed_in)) -> Response:
    if who is None:
        return to_signin(request)
    cp = current()
    with cp.db.session() as s:
        return page(
            request,
            who,
            "infrastructure.html",
            infra=infrastructure(s, cp.config),
            server=server_info(who, s),
            fabrics=list_fabrics(who, s),
        )
