"""Turns a recovery plan and an operation into a job's ordered task list.

Boot groups run in order; within a group each machine's operation contributes its own visible
tasks, then the group's actions (manual actions pause the job, scripts run) before the next
group starts. Every machine's values come from the request (RP-GROUP-PLAN).
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any

from sqlalchemy.orm import Session

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


def _values(run: dict[str, Any], item: ReplicatedItem) -> dict[str, Any]:
    given: dict[str, dict[str, Any]] = run.get("items", {}) or {}
    return dict(given.get(item.id) or given.get(item.name) or {})


def _item_tasks(
    s: Session, plan: RecoveryPlan, item: ReplicatedItem, operation: PlanOperation, run: dict[str, Any]
) -> list[TaskSpec]:
    snap = repo.snapshot(item)
    if operation is PlanOperation.FAILOVER:
        return ops.failover_tasks(
            snap, ops.FailoverRequest(run.get("point", "latest"), bool(run.get("planned")))
        )
    if operation is PlanOperation.FAILBACK:
        return ops.failover_tasks(snap, ops.FailoverRequest(run.get("point", "latest"), True), failback=True)
    if operation is PlanOperation.CHANGE_POINT:
        return ops.change_point_tasks(snap, run.get("point", "latest"), via_plan=True)
    if operation is PlanOperation.COMMIT:
        return ops.commit_tasks(snap)
    values = _values(run, item)
    missing = [k for k in ("master_target", "process_server") if not values.get(k)]
    if missing:
        raise invalid(
            f"items.{item.name}",
            f"The plan's reprotect needs {', '.join(missing)} for {item.name}.",
            "Give values for every machine of the plan (RP-GROUP-PLAN).",
        )
    group_mts = tuple(
        (other.id, str(_values(run, other).get("master_target", ""))) for other in _plan_items(s, plan)
    )
    request = ops.ProtectRequest(
        str(values["master_target"]),
        str(values["process_server"]),
        str(values.get("datastore", "")),
        str(values.get("retention_volume", "")),
        via_plan=True,
        group_master_targets=group_mts,
    )
    policy = repo.policy(s, item.policy_id)
    next_policy = (
        policy.failback_policy_id if snap.direction is Direction.FORWARD else policy.forward_policy_id
    ) or policy.id
    return ops.reprotect_tasks(snap, request, next_policy)


def _plan_items(s: Session, plan: RecoveryPlan) -> list[ReplicatedItem]:
    found = (s.get(ReplicatedItem, i) for g in plan.groups for i in g.get("items", []))
    return [i for i in found if i is not None]


def plan_tasks(
    s: Session, plan: RecoveryPlan, operation: PlanOperation, run: dict[str, Any]
) -> list[TaskSpec]:
    tasks: list[TaskSpec] = []
    for gi, group in enumerate(plan.groups, start=1):
        for item_id in group.get("items", []):
            item = s.get(ReplicatedItem, item_id)
            if item is None:
                continue
            for spec in _item_tasks(s, plan, item, operation, run):
                tasks.append(
                    TaskSpec(
                        f"Group {gi}: {item.name}: {spec.name}", spec.action, {**spec.args, "via_plan": True}
                    )
                )
        for action in group.get("actions_after", []):
            if action["kind"] == "manual":
                tasks.append(
                    TaskSpec(
                        f"Group {gi}: manual action: {action['name']}",
                        MANUAL_ACTION,
                        {"instructions": action.get("instructions", "")},
                    )
                )
            else:
                tasks.append(
                    TaskSpec(
                        f"Group {gi}: script: {action['name']}",
                        "script",
                        {
                            "command": action["command"],
                            "timeout_seconds": action["timeout_seconds"],
                            "plan": plan.name,
                            "operation": operation.value,
                        },
                    )
                )
    return tasks
