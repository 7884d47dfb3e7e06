"""Builds what the prerequisite checks read, from the database and live discovery.

Checks never trust cached inventory: both sites are discovered now. A site whose discovery
fails counts as not discovered (RP-VCENTER), which the checks report with the fabric's reason.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import select
from sqlalchemy.orm import Session

from siterecovery.dr import items as repo
from siterecovery.dr import rules
from siterecovery.dr.check_inputs import (
    ComponentView,
    GroupMember,
    ItemView,
    MasterTargetView,
    PlacedDisk,
    ReprotectContext,
    ReprotectRequest,
    RetentionVolumeView,
    Situation,
)
from siterecovery.dr.desired import agent_name
from siterecovery.dr.fabric_access import discover
from siterecovery.errors import Problem, SiteRecoveryError
from siterecovery.fabrics.base import Inventory, OsType, SiteKind
from siterecovery.store.context import current
from siterecovery.store.models import (
    Component,
    ReplicatedItem,
    ReplicationGroup,
    by_id_or_name,
    heartbeat_age,
)
from siterecovery.store.models import Fabric as FabricRow
from siterecovery.store.record import ItemRecord
from siterecovery.store.states import ComponentKind


def _fabric_row(s: Session, ident: str) -> FabricRow | None:
    return by_id_or_name(s, FabricRow, ident)


def _inventory(s: Session, fabric_id: str) -> Inventory | None:
    row = _fabric_row(s, fabric_id)
    if row is None:
        return None
    try:
        return discover(current(), row)
    except SiteRecoveryError:
        return None


def _component_view(row: Component | None) -> ComponentView | None:
    return None if row is None else ComponentView(row.name, heartbeat_age(row))


def _mt_view(row: Component | None) -> MasterTargetView | None:
    if row is None:
        return None
    volumes = []
    for v in row.stats.get("retention_volumes", []) or []:
        name = str(v.get("name") or v.get("path"))
        eligible = bool(v.get("eligible", int(v.get("capacity_bytes", 0) or 0) > 0))
        volumes.append(RetentionVolumeView(name, eligible, str(v.get("reason", ""))))
    return MasterTargetView(
        row.name, heartbeat_age(row), OsType(row.os_type or "linux"), row.machine, tuple(volumes)
    )


def _agent(
    s: Session, rec: ItemRecord, machine: str, site: str, inv: Inventory | None
) -> ComponentView | None:
    """AG-1: the agent counts only once it checked in after the machine's last boot."""
    row = repo.component(s, agent_name(site, machine), ComponentKind.AGENT)
    if row is None or row.last_heartbeat is None:
        return None
    found = inv.machine(machine) if inv is not None else None
    if found is not None and found.boot_time is not None and row.last_heartbeat < found.boot_time:
        return None
    return _component_view(row)


def _item_view(item: repo.ItemSnapshot, group: str | None, mt: str = "", ps: str = "") -> ItemView:
    rec = item.record
    return ItemView(
        id=item.id,
        machine=rec.machine,
        cloud_machine=rec.cloud_machine,
        cloud_resource_group=rec.cloud_resource_group,
        os_type=OsType(rec.os_type),
        os_version=rec.os_version,
        physical=rec.physical,
        state=item.state,
        direction=item.direction,
        machine_recorded=bool(rec.machine and rec.disks),
        disk_count=len(rec.disks),
        group=group,
        master_target=mt,
        process_server=ps,
        placed_disks=tuple(PlacedDisk(d["uuid"], d["backing"]) for d in rec.placed_disks),
    )


class ReprotectArgs(BaseModel):
    """What a reprotect (or a failback's check) names, read once from a request body or from a
    task's JSON arguments; what else those carry (the item, the sync mode, ...) is ignored here."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    master_target: str = ""
    process_server: str = ""
    # RP-VCENTER: an alternate vCenter (fabric id or name) to fail back to; none: the item's own.
    vcenter: str | None = None
    datastore: str | None = None
    retention_volume: str | None = None
    via_plan: bool = False
    group_master_targets: dict[str, str] = Field(default_factory=dict)  # item id or name -> MT
    pending_mt_disks: int = 0  # disks other running requests add to the master target (MT-3)


def build_situation(item: repo.ItemSnapshot, args: ReprotectArgs) -> Situation:
    cp = current()
    # RP-VCENTER: a reprotect may name an alternate vCenter (fabric id or name) to fail back to;
    # otherwise it is the one the machine was protected from.
    target = args.vcenter or item.record.onprem_fabric
    with cp.db.session() as s:
        onprem, cloud = _inventory(s, target), _inventory(s, item.record.cloud_fabric)
        mt = repo.component(s, args.master_target, ComponentKind.MASTER_TARGET)
        ps = repo.component(s, args.process_server, ComponentKind.PROCESS)
        vcenter = _fabric_row(s, target)
        # Problems name the group as the operator named it, not by its id.
        group = s.get(ReplicationGroup, item.group_id) if item.group_id else None
        return Situation(
            item=_item_view(
                item, group.name if group else item.group_id, mt.name if mt else "", ps.name if ps else ""
            ),
            vcenter=vcenter.name if vcenter else target,
            onprem=onprem,
            cloud=cloud or Inventory(site="cloud", kind=SiteKind.CLOUD, discovered_at=0.0),
            master_target=_mt_view(mt),
            process_server=_component_view(ps),
            agent=_agent(s, item.record, item.record.cloud_machine, "cloud", cloud),
            heartbeat_timeout=cp.config.heartbeat_timeout,
        )


def build_reprotect_context(item: repo.ItemSnapshot, args: ReprotectArgs) -> ReprotectContext:
    base = build_situation(item, args)
    with current().db.session() as s:
        group = _group_members(s, item, args)
    request = ReprotectRequest(
        master_target=args.master_target,
        process_server=args.process_server,
        datastore=args.datastore or None,
        retention_volume=args.retention_volume or None,
        via_plan=args.via_plan,
    )
    fields = {
        f: getattr(base, f)
        for f in (
            "item",
            "vcenter",
            "onprem",
            "cloud",
            "master_target",
            "process_server",
            "agent",
            "heartbeat_timeout",
        )
    }
    return ReprotectContext(**fields, request=request, group=group, pending_mt_disks=args.pending_mt_disks)


def _group_members(s: Session, item: repo.ItemSnapshot, args: ReprotectArgs) -> tuple[GroupMember, ...]:
    if item.group_id is None:
        return ()
    plan_mts = args.group_master_targets
    members = []
    for other in s.scalars(
        select(ReplicatedItem).where(ReplicatedItem.group_id == item.group_id, ReplicatedItem.id != item.id)
    ):
        rec = ItemRecord.model_validate(other.details)
        members.append(
            GroupMember(other.name, OsType(rec.os_type), plan_mts.get(other.id) or plan_mts.get(other.name))
        )
    return tuple(members)


def forward_problems(item: repo.ItemSnapshot, args: ReprotectArgs) -> list[Problem]:
    """Re-protect on-premises → cloud after a failback: the components must be there and connected."""
    cp = current()
    problems: list[Problem] = []
    with cp.db.session() as s:
        onprem = _inventory(s, item.record.onprem_fabric)
        agent = _agent(s, item.record, item.record.machine, "onprem", onprem)
        if agent is None or not agent.connected(cp.config.heartbeat_timeout):
            problems.append(
                rules.AGENT_NOT_REGISTERED.refusal(
                    f"The agent of {item.record.machine} has not registered since the machine booted.",
                    "Wait a few minutes, then retry.",
                )
            )
        for kind, ident in (
            (ComponentKind.PROCESS, args.process_server),
            (ComponentKind.MASTER_TARGET, args.master_target),
        ):
            row = repo.component(s, ident, kind)
            age = heartbeat_age(row) if row is not None else None
            if age is None or age > cp.config.heartbeat_timeout:
                rule = rules.PS_DISCONNECTED if kind is ComponentKind.PROCESS else rules.MT_NOT_DISCOVERED
                problems.append(
                    rule.refusal(
                        f"The {kind} {ident!r} is not connected.",
                        f"Start the {kind} or choose a connected one.",
                    )
                )
    return problems
