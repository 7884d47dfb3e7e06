"""Recovery plans (ordered boot groups with manual actions and scripts) and replication groups."""

from __future__ import annotations

from fastapi import APIRouter, Depends
from sqlalchemy import select
from sqlalchemy.orm import Session

from siterecovery.control.api.deps import operator, reader, session
from siterecovery.control.plan_jobs import PlanOperation, PlanRun, plan_tasks
from siterecovery.control.schemas import (
    GroupCreate,
    GroupOut,
    JobStarted,
    PlanCreate,
    PlanGroup,
    PlanOut,
)
from siterecovery.errors import Problem, SiteRecoveryError, Status, conflict, invalid, not_found
from siterecovery.store import jobs as engine
from siterecovery.store.models import RecoveryPlan, ReplicatedItem, ReplicationGroup, by_id_or_name, new_id
from siterecovery.store.states import Role
from siterecovery.store.tokens import Principal

router = APIRouter(prefix="/api", tags=["recovery plans"])


def plan_view(p: RecoveryPlan) -> PlanOut:
    return PlanOut(id=p.id, name=p.name, groups=[PlanGroup.model_validate(g) for g in p.groups])


def find_plan(s: Session, ident: str) -> RecoveryPlan:
    row = by_id_or_name(s, RecoveryPlan, ident)
    if row is None:
        raise not_found("recovery plan", ident)
    return row


@router.post("/recoveryPlans", status_code=201)
def create_plan(
    body: PlanCreate, who: Principal = Depends(operator), s: Session = Depends(session, scope="function")
) -> PlanOut:
    if s.scalar(select(RecoveryPlan).where(RecoveryPlan.name == body.name)) is not None:
        raise conflict(
            "plan-exists", f"A recovery plan named {body.name!r} already exists.", "Choose another name."
        )
    groups = []
    seen: set[str] = set()
    for gi, group in enumerate(body.groups):
        ids = []
        for ident in group.items:
            item = s.get(ReplicatedItem, ident) or s.scalar(
                select(ReplicatedItem).where(ReplicatedItem.name == ident)
            )
            if item is None:
                raise invalid(
                    f"groups.{gi}.items",
                    f"No replicated item {ident!r} exists.",
                    "List replicated items and use their names or ids.",
                )
            if item.id in seen:
                raise invalid(
                    f"groups.{gi}.items",
                    f"Item {ident!r} appears twice in the plan.",
                    "Put each machine in exactly one boot group.",
                )
            seen.add(item.id)
            ids.append(item.id)
        if any(a.kind == "script" for a in group.actions_after) and not who.can(Role.ADMIN):
            raise SiteRecoveryError(
                Problem(
                    "forbidden",
                    "Only an admin may add scripts to a recovery plan.",
                    "Ask an admin, or use a manual action instead.",
                ),
                Status.FORBIDDEN,
            )
        groups.append(PlanGroup(items=ids, actions_after=group.actions_after).model_dump())
    plan = RecoveryPlan(id=new_id("plan"), name=body.name, groups=groups)
    s.add(plan)
    return plan_view(plan)


@router.get("/recoveryPlans")
def list_plans(
    _: Principal = Depends(reader), s: Session = Depends(session, scope="function")
) -> list[PlanOut]:
    return [plan_view(p) for p in s.scalars(select(RecoveryPlan).order_by(RecoveryPlan.created_at))]


@router.get("/recoveryPlans/{ident}")
def show_plan(
    ident: str, _: Principal = Depends(reader), s: Session = Depends(session, scope="function")
) -> PlanOut:
    return plan_view(find_plan(s, ident))


@router.post("/recoveryPlans/{ident}/{operation}", status_code=202)
def run_plan(
    ident: str,
    operation: PlanOperation,
    body: PlanRun | None = None,
    _: Principal = Depends(operator),
    s: Session = Depends(session, scope="function"),
) -> JobStarted:
    plan = find_plan(s, ident)
    run = body or PlanRun()
    tasks = plan_tasks(s, plan, operation, run)
    name, plan_id = plan.name, plan.id
    s.commit()
    job_id = engine.create_job(
        f"plan-{operation.value}",
        tasks,
        target_type="recoveryPlan",
        target_id=plan_id,
        target_name=name,
        params=run.model_dump(),
    )
    return JobStarted(job_id=job_id)


@router.post("/replicationGroups", status_code=201)
def create_group(
    body: GroupCreate, _: Principal = Depends(operator), s: Session = Depends(session, scope="function")
) -> GroupOut:
    if s.scalar(select(ReplicationGroup).where(ReplicationGroup.name == body.name)) is not None:
        raise conflict(
            "group-exists", f"A replication group named {body.name!r} already exists.", "Choose another name."
        )
    g = ReplicationGroup(id=new_id("rg"), name=body.name)
    s.add(g)
    return GroupOut(id=g.id, name=g.name, items=[])


@router.get("/replicationGroups")
def list_groups(
    _: Principal = Depends(reader), s: Session = Depends(session, scope="function")
) -> list[GroupOut]:
    out = []
    for g in s.scalars(select(ReplicationGroup).order_by(ReplicationGroup.name)):
        items = [i.name for i in s.scalars(select(ReplicatedItem).where(ReplicatedItem.group_id == g.id))]
        out.append(GroupOut(id=g.id, name=g.name, items=items))
    return out
