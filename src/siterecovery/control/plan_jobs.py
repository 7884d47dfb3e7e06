"""Turns a recovery plan and an operation into a job's ordered task list.

Boot groups run in order; within a group each machine's operation contributes its own visible
tasks, then the group's actions (manual actions pause the job, scripts run) before the next
group starts. Every machine's values come from the request (RP-GROUP-PLAN).
"""

from __future__ import annotations

from enum import StrEnum

from pydantic import Field
from sqlalchemy.orm import Session

from siterecovery.control.schemas import Flag, PlanGroup, Strict
from siterecovery.dr import items as repo
from siterecovery.dr import operations as ops
from siterecovery.errors import invalid
from siterecovery.store.jobs import MANUAL_ACTION, TaskSpec
from siterecovery.store.models import RecoveryPlan, ReplicatedItem
from siterecovery.store.states import Direction


class PlanOperation(StrEnum):
    FAILOVER = "failover"
    CHANGE_POINT = "change-point"
    COMMIT = "commit"
    REPROTECT = "reprotect"
    FAILBACK = "failback"


class PlanItemValues(Strict):
    """One machine's reprotect values in a plan run (RP-GROUP-PLAN)."""

    master_target: str = Field(default="", max_length=200)
    process_server: str = Field(default="", max_length=200)
    datastore: str = Field(default="", max_length=200)
    retention_volume: str = Field(default="", max_length=500)


class PlanRun(Strict):
    """Per-operation values; `items` supplies values for every machine (RP-GROUP-PLAN), by id or name."""

    point: str = Field(default="latest", max_length=100)
    planned: Flag = False
    items: dict[str, PlanItemValues] = Field(default_factory=dict)


def _values(run: PlanRun, item: ReplicatedItem) -> PlanItemValues:
    return run.items.get(item.id) or run.items.get(item.name) or PlanItemValues()


def _groups(plan: RecoveryPlan) -> list[PlanGroup]:
    return [PlanGroup.model_validate(g) for g in plan.groups]


def _item_tasks(
    s: Session, plan: RecoveryPlan, item: ReplicatedItem, operation: PlanOperation, run: PlanRun
) -> list[TaskSpec]:
    snap = repo.snapshot(item)
    if operation is PlanOperation.FAILOVER:
        return ops.failover_tasks(snap, ops.FailoverRequest(run.point, run.planned))
    if operation is PlanOperation.FAILBACK:
        return ops.failover_tasks(snap, ops.FailoverRequest(run.point, True), failback=True)
    if operation is PlanOperation.CHANGE_POINT:
        return ops.change_point_tasks(snap, run.point, via_plan=True)
    if operation is PlanOperation.COMMIT:
        return ops.commit_tasks(snap)
    values = _values(run, item)
    needed = (("master_target", values.master_target), ("process_server", values.process_server))
    missing = [name for name, value in needed if not value]
    if missing:
        raise invalid(
            f"items.{item.name}",
            f"The plan's reprotect needs {', '.join(missing)} for {item.name}.",
            "Give values for every machine of the plan (RP-GROUP-PLAN).",
        )
    group_mts = tuple((other.id, _values(run, other).master_target) for other in _plan_items(s, plan))
    request = ops.ProtectRequest(
        values.master_target,
        values.process_server,
        values.datastore,
        values.retention_volume,
        via_plan=True,
        group_master_targets=group_mts,
    )
    policy = repo.policy(s, item.policy_id)
    next_policy = (
        policy.failback_policy_id if snap.direction is Direction.FORWARD else policy.forward_policy_id
    ) or policy.id
    return ops.reprotect_tasks(snap, request, next_policy)


def _plan_items(s: Session, plan: RecoveryPlan) -> list[ReplicatedItem]:
    found = (s.get(ReplicatedItem, i) for g in _groups(plan) for i in g.items)
    return [i for i in found if i is not None]


def plan_tasks(s: Session, plan: RecoveryPlan, operation: PlanOperation, run: PlanRun) -> list[TaskSpec]:
    tasks: list[TaskSpec] = []
    for gi, group in enumerate(_groups(plan), start=1):
        for item_id in group.items:
            item = s.get(ReplicatedItem, item_id)
            if item is None:
                continue
            for spec in _item_tasks(s, plan, item, operation, run):
                tasks.append(
                    TaskSpec(
                        f"Group {gi}: {item.name}: {spec.name}", spec.action, {**spec.args, "via_plan": True}
                    )
                )
        for action in group.actions_after:
            if action.kind == "manual":
                tasks.append(
                    TaskSpec(
                        f"Group {gi}: manual action: {action.name}",
                        MANUAL_ACTION,
                        {"instructions": action.instructions},
                    )
                )
            else:
                tasks.append(
                    TaskSpec(
                        f"Group {gi}: script: {action.name}",
                        "script",
                        {
                            "command": action.command,
                            "timeout_seconds": action.timeout_seconds,
                            "plan": plan.name,
                            "operation": operation.value,
                        },
                    )
                )
    return tasks
