"""The portal's actions: HTML forms posted to these routes, which call the REST handlers' own code.

Every POST needs a session, a CSRF token bound to it, and the operator role, exactly as the API
(readers get 403 and never see the buttons). A refused operation (`SiteRecoveryError`) renders
its problems — code, message, remediation — and changes nothing; a started job redirects to the
job's page.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import RedirectResponse, Response
from pydantic import ValidationError
from sqlalchemy.orm import Session

from siterecovery.control.api import item_actions
from siterecovery.control.api import jobs as jobs_api
from siterecovery.control.api import plans as plans_api
from siterecovery.control.api.items import find_item
from siterecovery.control.plan_jobs import PlanOperation, PlanRun
from siterecovery.errors import Problem, SiteRecoveryError
from siterecovery.portal.render import forbidden, page, problems_of, refused
from siterecovery.portal.reprotect_form import Choice, build_dialog
from siterecovery.portal.session import csrf_ok, sign_out_response, signed_in, to_signin
from siterecovery.portal.session import form_fields as form_dep
from siterecovery.portal.views import ItemAction, actions_for, item_rows
from siterecovery.store.context import current
from siterecovery.store.models import ReplicatedItem
from siterecovery.store.record import ItemRecord
from siterecovery.store.states import Role
from siterecovery.store.tokens import Principal

router = APIRouter(include_in_schema=False)

_CSRF = Problem(
    "csrf-invalid",
    "The form's security token does not match this session.",
    "Reload the page and submit the form again.",
)


def _guard(request: Request, who: Principal | None, form: dict[str, str]) -> Principal | Response:
    """The operator who may proceed with this post, or the response that refuses it."""
    if who is None:
        return to_signin(request)
    if not csrf_ok(request, form):
        return refused(request, who, [_CSRF], 403)
    if not who.can(Role.OPERATOR):
        return forbidden(request, who)
    return who


def _to_job(job_id: str) -> RedirectResponse:
    return RedirectResponse(f"/jobs/{job_id}", status_code=303)


@router.post("/signout")
def signout(request: Request, form: dict[str, str] = Depends(form_dep)) -> Response:
    if not csrf_ok(request, form):
        return refused(request, None, [_CSRF], 403)
    return sign_out_response()


_POINT_ACTIONS = (ItemAction.FAILOVER, ItemAction.TEST_FAILOVER, ItemAction.FAILBACK, ItemAction.CHANGE_POINT)


def _choice(form: dict[str, str]) -> Choice:
    return Choice(
        form.get("master_target", ""),
        form.get("process_server", ""),
        form.get("datastore", ""),
        form.get("retention_volume", ""),
    )


def _action_page(
    request: Request,
    who: Principal,
    ident: str,
    action: ItemAction,
    form: dict[str, str],
    outcome: dict[str, Any],
    status: int = 200,
) -> Response:
    """The confirmation page (or Re-Protect dialog) of one item action, with any outcome shown."""
    cp = current()
    with cp.db.session() as s:
        row = find_item(s, ident)
        found = item_rows(s, ids=[row.id])[0]
        if action is ItemAction.REPROTECT:
            dialog = build_dialog(s, cp.config, row, _choice(form))
            return page(request, who, "reprotect.html", row=found, dialog=dialog, status=status, **outcome)
        points = item_actions.recovery_points(ident, who, s) if action in _POINT_ACTIONS else []
        return page(
            request,
            who,
            "action.html",
            row=found,
            action=action,
            form=form,
            points=points,
            status=status,
            **outcome,
        )


def _ensure_offered(row: ReplicatedItem, action: ItemAction) -> None:
    """Only the actions the items table offers in the item's state may be started."""
    has_test = ItemRecord.model_validate(row.details).test is not None
    if action not in actions_for(row.state, row.direction, has_test):
        raise SiteRecoveryError(
            Problem(
                "invalid-state",
                f"Item {row.name} is {row.state}; {action.caption} is not available in this state.",
                "Reload the replicated items and choose an action its row offers.",
            )
        )


@router.get("/items/{ident}/{action}")
def action_page(
    ident: str, action: ItemAction, request: Request, who: Principal | None = Depends(signed_in)
) -> Response:
    if who is None:
        return to_signin(request)
    if not who.can(Role.OPERATOR):
        return forbidden(request, who)
    try:
        with current().db.session() as s:
            _ensure_offered(find_item(s, ident), action)
        return _action_page(request, who, ident, action, {}, {"problems": [], "readiness": None})
    except SiteRecoveryError as exc:
        return refused(request, who, problems_of(exc), int(exc.status))


def _start(
    action: ItemAction, ident: str, form: dict[str, str], who: Principal, s: Session
) -> item_actions.Started | item_actions.Readiness:
    check = form.get("op") == "check"
    if action in (ItemAction.FAILOVER, ItemAction.TEST_FAILOVER):
        body = item_actions.FailoverBody(
            point=form.get("point") or "latest",
            planned=form.get("planned") == "on",
            test=action is ItemAction.TEST_FAILOVER,
        )
        return item_actions.failover(ident, body, who, s)
    if action is ItemAction.TEST_CLEANUP:
        return item_actions.test_cleanup(ident, who, s)
    if action is ItemAction.CHANGE_POINT:
        change = item_actions.ChangePointBody(point=form.get("point") or "latest")
        return item_actions.change_point(change, ident, who, s)
    if action is ItemAction.COMMIT:
        return item_actions.commit(ident, who, s)
    if action is ItemAction.DISABLE:
        return item_actions.disable(ident, who, s)
    if action is ItemAction.FAILBACK:
        fb = item_actions.FailbackBody(point=form.get("point") or "latest", what_if=check)
        return item_actions.failback(ident, fb, who, s)
    rp = item_actions.ReprotectBody(
        master_target=form.get("master_target", ""),
        process_server=form.get("process_server", ""),
        datastore=form.get("datastore", ""),
        retention_volume=form.get("retention_volume", ""),
        what_if=check,
    )
    return item_actions.reprotect(ident, rp, who, s)


@router.post("/items/{ident}/{action}")
def run_action(
    ident: str,
    action: ItemAction,
    request: Request,
    who: Principal | None = Depends(signed_in),
    form: dict[str, str] = Depends(form_dep),
) -> Response:
    guarded = _guard(request, who, form)
    if isinstance(guarded, Response):
        return guarded
    outcome: dict[str, Any] = {"problems": [], "readiness": None}
    status = 200
    try:
        with current().db.session() as s:
            _ensure_offered(find_item(s, ident), action)
            result = _start(action, ident, form, guarded, s)
        if isinstance(result, item_actions.Started):
            return _to_job(result.job_id)
        outcome["readiness"] = result
    except ValidationError as exc:
        outcome["problems"], status = problems_of(exc), 422
    except SiteRecoveryError as exc:
        outcome["problems"], status = problems_of(exc), int(exc.status)
    return _action_page(request, guarded, ident, action, form, outcome, status)


def _posted(
    request: Request, who: Principal | None, form: dict[str, str], act: Callable[[Principal], str]
) -> Response:
    """A guarded post that starts or changes a job (`act` returns its id): the job's page, or the
    page listing the problems that refused it."""
    guarded = _guard(request, who, form)
    if isinstance(guarded, Response):
        return guarded
    try:
        job_id = act(guarded)
    except ValidationError as exc:
        return refused(request, guarded, problems_of(exc), 422)
    except SiteRecoveryError as exc:
        return refused(request, guarded, problems_of(exc), int(exc.status))
    return _to_job(job_id)


def _job_route(op: Callable[[str, Principal], dict[str, str]]) -> Callable[..., Response]:
    """The POST route of one job operation (cancel, resume)."""

    def route(
        job_id: str,
        request: Request,
        who: Principal | None = Depends(signed_in),
        form: dict[str, str] = Depends(form_dep),
    ) -> Response:
        def act(operator: Principal) -> str:
            op(job_id, operator)
            return job_id

        return _posted(request, who, form, act)

    return route


router.add_api_route("/jobs/{job_id}/cancel", _job_route(jobs_api.cancel), methods=["POST"])
router.add_api_route("/jobs/{job_id}/resume", _job_route(jobs_api.resume), methods=["POST"])


@router.post("/plans/{ident}/{operation}")
def run_plan(
    ident: str,
    operation: PlanOperation,
    request: Request,
    who: Principal | None = Depends(signed_in),
    form: dict[str, str] = Depends(form_dep),
) -> Response:
    def act(operator: Principal) -> str:
        with current().db.session() as s:
            plan = plans_api.find_plan(s, ident)
            values = {
                key: form.get(key, "")
                for key in ("master_target", "process_server", "datastore", "retention_volume")
            }
            machines = [m for g in plans_api.plan_view(plan).groups for m in g.items]
            run = PlanRun(
                point=form.get("point") or "latest",
                planned=form.get("planned") == "on",
                items={m: values for m in machines} if operation is PlanOperation.REPROTECT else {},
            )
            return plans_api.run_plan(ident, operation, run, operator, s).job_id

    return _posted(request, who, form, act)
