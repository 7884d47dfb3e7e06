"""Turns a recovery plan and an operation into a job's ordered task list.

Boot groups run in order; within a group each machine gets its own task, then the group's
actions (manual actions pause the job, scripts run) before the next group starts.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any

from sqlalchemy.orm import Session

from siterecovery.control.db import RecoveryPlan, ReplicatedItem
from siterecovery.control.jobs import MANUAL_ACTION, TaskSpec


class PlanOperation(StrEnum):
    FAILOVER = "failover"
    TEST_FAILOVER = "test-failover"
    COMMIT = "commit"
    REPROTECT = "reprotect"
    FAILBACK = "failback"


def plan_tasks(
    s: Session, plan: RecoveryPlan, operation: PlanOperation, run: dict[str, Any]
) -> list[TaskSpec]:
    tasks: list[TaskSpec] = []
    for gi, group in enumerate(plan.groups, start=1):
        for item_id in group.get("items", []):
            item = s.get(ReplicatedItem, item_id)
            name = item.name if item is not None else item_id
            values = dict(run.get("items", {}).get(item_id, {}) or run.get("items", {}).get(name, {}))
            tasks.append(
                TaskSpec(
                    f"Group {gi}: {operation.value} {name}",
                    f"plan-item-{operation.value}",
                    {
                        "item": item_id,
                        "plan": plan.id,
                        "point": run.get("point", "latest"),
                        "planned": run.get("planned", False),
                        "values": values,
                    },
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
