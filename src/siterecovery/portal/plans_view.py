"""Recovery plans as the portal shows them: boot groups in order, their machines and actions.

Also the choices for running a plan's reprotect: one master target, process server, datastore
and retention volume applied to every machine of the plan (a replication group must share one
master target anyway, RP-GROUP-MT).
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from siterecovery.config import ServerConfig
from siterecovery.control.api.plans import plan_view
from siterecovery.control.plan_jobs import PlanOperation
from siterecovery.control.schemas import PlanAction
from siterecovery.portal.views import retention_choices, servers
from siterecovery.store.models import Fabric, RecoveryPlan, ReplicatedItem
from siterecovery.store.states import ComponentKind


@dataclass(frozen=True)
class PlanMachine:
    id: str
    name: str
    state: str
    direction: str


@dataclass(frozen=True)
class PlanGroupRow:
    order: int
    machines: list[PlanMachine]
    actions: list[PlanAction]


@dataclass(frozen=True)
class PlanRow:
    id: str
    name: str
    groups: list[PlanGroupRow]
    machines: list[PlanMachine]


def plan_rows(s: Session) -> list[PlanRow]:
    items = {i.id: i for i in s.scalars(select(ReplicatedItem))}
    out = []
    for plan in s.scalars(select(RecoveryPlan).order_by(RecoveryPlan.created_at)):
        view = plan_view(plan)
        groups = []
        for n, group in enumerate(view.groups, start=1):
            machines = [
                PlanMachine(i.id, i.name, i.state, i.direction)
                for i in (items.get(ident) for ident in group.items)
                if i is not None
            ]
            groups.append(PlanGroupRow(n, machines, list(group.actions_after)))
        out.append(PlanRow(view.id, view.name, groups, [m for g in groups for m in g.machines]))
    return out


@dataclass(frozen=True)
class PlanChoices:
    operations: list[str]
    master_targets: list[str]
    process_servers: list[str]
    datastores: list[str]
    retention_volumes: list[tuple[str, str]]  # (master target, eligible volume)


def plan_choices(s: Session, config: ServerConfig) -> PlanChoices:
    mts = servers(s, config, ComponentKind.MASTER_TARGET)
    datastores: list[str] = []
    for fabric in s.scalars(select(Fabric).order_by(Fabric.name)):
        for d in (fabric.inventory or {}).get("datastores", []):
            name = str(d.get("name"))
            if name not in datastores:
                datastores.append(name)
    return PlanChoices(
        operations=[op.value for op in PlanOperation],
        master_targets=[m.name for m in mts],
        process_servers=[p.name for p in servers(s, config, ComponentKind.PROCESS)],
        datastores=datastores,
        retention_volumes=[(m.name, v.name) for m in mts for v in retention_choices(m.stats) if v.eligible],
    )
