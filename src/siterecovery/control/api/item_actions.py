"""Item operations: enable, failover, commit, reprotect (with what-if), failback, disable.

Each validates before anything changes (state, prerequisites) and then starts a job; the job's
first task checks again, since the world may change between the request and the task.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends
from pydantic import Field
from sqlalchemy import select
from sqlalchemy.orm import Session

from siterecovery.control.api.deps import control_plane, operator, reader, session
from siterecovery.control.schemas import Flag, ProblemItem, RecoveryPointOut, Strict
from siterecovery.dr import items as repo
from siterecovery.dr import operations as ops
from siterecovery.dr import rules
from siterecovery.dr.azure_failback import (
    azure_agent_problems,
    azure_reprotect_tasks,
    azure_way_back_problems,
)
from siterecovery.dr.azure_jobs import azure_enable_problems, is_azure
from siterecovery.dr.bookmarks import request_bookmark
from siterecovery.dr.checks import check_failback, check_reprotect
from siterecovery.dr.fabric_access import discover, recorded
from siterecovery.dr.libvirt_capture import enable_capture_problems, reprotect_capture_problems
from siterecovery.dr.notes import PlannedTask, plan_notes
from siterecovery.dr.placement import replica_paths
from siterecovery.dr.platforms import libvirt_reprotect_problems, recorded_xml
from siterecovery.dr.recovery_points import points_of
from siterecovery.dr.situation import (
    ReprotectArgs,
    build_reprotect_context,
    build_situation,
    forward_problems,
)
from siterecovery.errors import SiteRecoveryError, Status, conflict, invalid, not_found
from siterecovery.fabrics.base import SiteKind
from siterecovery.store import jobs as engine
from siterecovery.store.context import ControlPlane, current
from siterecovery.store.models import Fabric as FabricRow
from siterecovery.store.models import Job, Policy, ReplicatedItem, ReplicationGroup, by_id_or_name, new_id
from siterecovery.store.record import ItemDisk, ItemRecord, NicRecord
from siterecovery.store.states import ComponentKind, Direction, JobState, PolicyKind, ProtectionState
from siterecovery.store.tokens import Principal

router = APIRouter(prefix="/api/replicatedItems", tags=["replicated items"])

NamePattern = Field(min_length=1, max_length=200)


class EnableRequest(Strict):
    machine: str = NamePattern
    policy: str = NamePattern
    process_server: str = NamePattern
    master_target: str = NamePattern
    source_fabric: str = Field(default="onprem", max_length=200)
    target_fabric: str = Field(default="cloud", max_length=200)
    # A libvirt target: the storage pool the replica volumes are placed in.
    target_datastore: str = Field(default="", max_length=200)
    # The recovery machine's name on the target site; default the machine's own.
    recovery_name: str = Field(default="", max_length=200)
    resource_group: str = Field(default="", max_length=200)
    group: str | None = Field(default=None, max_length=200)


class FailoverBody(Strict):
    point: str = Field(default="latest", max_length=100)
    planned: Flag = False
    test: Flag = False


class ReprotectBody(Strict):
    master_target: str = NamePattern
    process_server: str = NamePattern
    datastore: str = Field(default="", max_length=200)
    retention_volume: str = Field(default="", max_length=500)
    # RP-VCENTER: fail back to an alternate vCenter (a fabric's name or id) instead of the one the
    # machine was protected from; the checks judge that vCenter and, on success, it becomes the
    # item's on-premises site for the reprotect job and the failback.
    vcenter: str = Field(default="", max_length=200)
    # From Azure: through an agent in the recovery VM (needs a route to on-premises, AZ-VPN; not
    # built, refused) instead of agentless over SAS.
    agent: Flag = False
    what_if: Flag = False


class FailbackBody(Strict):
    point: str = Field(default="latest", max_length=100)
    what_if: Flag = False


class Started(Strict):
    job_id: str
    item_id: str


class Readiness(Strict):
    ready: bool
    problems: list[ProblemItem]
    notes: list[PlannedTask] = Field(default_factory=list)


def _fabric(s: Session, ident: str) -> FabricRow:
    row = by_id_or_name(s, FabricRow, ident)
    if row is None:
        raise not_found("fabric", ident)
    return row


def _item_for_dr(s: Session, ident: str) -> repo.ItemSnapshot:
    """CS-1: a machine the configuration server does not know cannot be reprotected or failed back."""
    row = by_id_or_name(s, ReplicatedItem, ident)
    if row is None:
        raise SiteRecoveryError(
            rules.CS_UNKNOWN_MACHINE.refusal(
                f"Machine {ident!r} is not in the configuration server's database.",
                "Restore the configuration server from a backup holding the machine, or protect it anew.",
            ),
            Status.NOT_FOUND,
        )
    return repo.snapshot(row)


def _start(
    kind: str, item: repo.ItemSnapshot, tasks: list[engine.TaskSpec], params: dict[str, Any]
) -> Started:
    _ensure_idle(item)
    job_id = engine.create_job(
        kind, tasks, target_type="replicatedItem", target_id=item.id, target_name=item.name, params=params
    )
    return Started(job_id=job_id, item_id=item.id)


def _ensure_idle(item: repo.ItemSnapshot) -> None:
    """One job at a time per item: two workflows moving the same disks would undo each other."""
    with current().db.session() as s:
        busy = s.scalar(
            select(Job).where(
                Job.target_id == item.id,
                Job.state.in_([JobState.QUEUED, JobState.RUNNING, JobState.PAUSED]),
            )
        )
        if busy is not None:
            raise conflict(
                "item-busy",
                f"Job {busy.id} ({busy.kind}) is still {busy.state} on item {item.name}.",
                f"Wait for it to finish (`jobs watch {busy.id}`), or cancel it, then retry.",
            )


@router.post("", status_code=202)
def enable(
    body: EnableRequest,
    _: Principal = Depends(operator),
    cp: ControlPlane = Depends(control_plane),
    s: Session = Depends(session, scope="function"),
) -> Started:
    """FW-1: protect an on-premises machine: initial replication to the cloud, then continuous."""
    source, target = _fabric(s, body.source_fabric), _fabric(s, body.target_fabric)
    policy = by_id_or_name(s, Policy, body.policy)
    if policy is None:
        raise not_found("policy", body.policy)
    if policy.kind != PolicyKind.REPLICATION:
        raise invalid(
            "policy",
            f"Policy {policy.name} is a failback policy.",
            "Enable replication with a replication policy; failback policies are chosen by reprotect.",
        )
    if s.scalar(select(ReplicatedItem).where(ReplicatedItem.name == body.machine)) is not None:
        raise conflict(
            "item-exists",
            f"Machine {body.machine} is already protected.",
            "Disable its protection first, or pick another machine.",
        )
    inventory = discover(cp, source)
    machine = inventory.machine(body.machine)
    if machine is None:
        raise invalid(
            "machine",
            f"Machine {body.machine} was not found on fabric {source.name}.",
            "List the fabric's machines (`machines list --fabric`) and pick one.",
        )
    problems = []
    ps = repo.component(s, body.process_server, ComponentKind.PROCESS)
    mt = repo.component(s, body.master_target, ComponentKind.MASTER_TARGET)
    agent = repo.component(s, f"onprem/{machine.name}", ComponentKind.AGENT)
    if ps is None:
        problems.append(
            rules.PS_DISCONNECTED.refusal(
                f"No process server {body.process_server!r} is registered.",
                "Start the process server and register it with the passphrase.",
            )
        )
    if mt is None:
        problems.append(
            rules.MT_NOT_DISCOVERED.refusal(
                f"No master target {body.master_target!r} is registered.",
                "Start the master target and register it with the passphrase.",
            )
        )
    if agent is None:
        problems.append(
            rules.AGENT_NOT_REGISTERED.refusal(
                f"The agent of {machine.name} has not registered.",
                "Power the machine on and wait a few minutes for its agent to register.",
            )
        )
    problems += azure_enable_problems(cp, target, machine)  # AZ-*: what ARM would refuse at failover
    problems += enable_capture_problems(s, source, machine)  # LV-CAPTURE: the agent serves each disk
    if problems:
        raise SiteRecoveryError(problems)
    assert ps is not None and mt is not None
    group_id = None
    if body.group:
        group = s.scalar(select(ReplicationGroup).where(ReplicationGroup.name == body.group))
        if group is None:
            group = ReplicationGroup(id=new_id("rg"), name=body.group)
            s.add(group)
            s.flush()  # the item's foreign key needs the group row first
        group_id = group.id
    item_id = new_id("item")
    cloud_paths = replica_paths(
        target.id, machine.name, [d.label for d in machine.disks], body.target_datastore
    )
    rec = ItemRecord(
        onprem_fabric=source.id,
        cloud_fabric=target.id,
        machine=machine.name,
        cloud_machine=body.recovery_name or machine.name,
        cloud_resource_group=body.resource_group,
        os_type=machine.os_type.value,
        os_version=machine.os_version,
        physical=machine.physical,
        disks=[
            ItemDisk(
                label=d.label,
                size=d.size_bytes,
                onprem_path=d.backing,
                onprem_uuid=d.uuid,
                cloud_path=cloud_paths[d.label],
            )
            for d in machine.disks
        ],
        nics=[
            NicRecord(
                name=n.name,
                mac=n.mac,
                ip_mode=n.ip_mode.value,
                address=n.address,
                prefix=n.prefix,
                gateway=n.gateway,
            )
            for n in machine.nics
        ],
        packages=list(machine.packages),
        domain_xml=recorded_xml(source, machine.name),
    )
    s.add(
        ReplicatedItem(
            id=item_id,
            name=machine.name,
            machine=machine.name,
            source_fabric_id=source.id,
            target_fabric_id=target.id,
            direction=Direction.FORWARD,
            state=ProtectionState.ENABLING,
            policy_id=policy.id,
            process_server_id=ps.id,
            master_target_id=mt.id,
            group_id=group_id,
            details=rec.model_dump(mode="json"),
        )
    )
    s.commit()
    item = repo.load(item_id)
    return _start("enable", item, ops.enable_tasks(item_id, ps.id, mt.id, policy.id, ""), body.model_dump())


@router.post("/{ident}/failover", status_code=202)
def failover(
    ident: str,
    body: FailoverBody,
    _: Principal = Depends(operator),
    s: Session = Depends(session, scope="function"),
) -> Started:
    item = repo.snapshot(repo.get_item(s, ident))
    if body.test:
        return _start("test-failover", item, ops.test_failover_tasks(item, body.point), body.model_dump())
    tasks = ops.failover_tasks(item, ops.FailoverRequest(body.point, body.planned))
    return _start("failover", item, tasks, body.model_dump())


@router.post("/{ident}/testCleanup", status_code=202)
def test_cleanup(
    ident: str, _: Principal = Depends(operator), s: Session = Depends(session, scope="function")
) -> Started:
    """Delete the test failover's machine and disk copies."""
    item = repo.snapshot(repo.get_item(s, ident))
    return _start("test-cleanup", item, ops.test_cleanup_tasks(item), {})


@router.get("/{ident}/recoveryPoints")
def recovery_points(
    ident: str, _: Principal = Depends(reader), s: Session = Depends(session, scope="function")
) -> list[RecoveryPointOut]:
    """Points every disk of the item has, newest first; `latest` is always first (FW-3)."""
    item = repo.snapshot(repo.get_item(s, ident))
    return [RecoveryPointOut.model_validate(p.as_dict()) for p in points_of(s, item.record)]


@router.post("/{ident}/bookmarks", status_code=201)
def take_bookmark(
    ident: str, _: Principal = Depends(operator), s: Session = Depends(session, scope="function")
) -> dict[str, str]:
    """Take an app-consistent point now (a group point for every member when the item is in a group)."""
    row = repo.get_item(s, ident)
    if row.state != ProtectionState.PROTECTED:
        raise conflict(
            "invalid-state",
            f"Item {row.name} is {row.state}; points are taken while protected.",
            "Enable or reprotect it first.",
        )
    return {"tag": request_bookmark(s, row)}


class ChangePointBody(Strict):
    point: str = Field(min_length=1, max_length=100)


@router.post("/{ident}/changePoint", status_code=202)
def change_point(
    body: ChangePointBody,
    ident: str,
    _: Principal = Depends(operator),
    s: Session = Depends(session, scope="function"),
) -> Started:
    """Before commit: boot the recovery machine again from another retained point (FW-2)."""
    item = repo.snapshot(repo.get_item(s, ident))
    return _start("change-point", item, ops.change_point_tasks(item, body.point), body.model_dump())


@router.post("/{ident}/commit", status_code=202)
def commit(
    ident: str, _: Principal = Depends(operator), s: Session = Depends(session, scope="function")
) -> Started:
    item = repo.snapshot(repo.get_item(s, ident))
    return _start("commit", item, ops.commit_tasks(item), {})


def _fail_back_to(item: repo.ItemSnapshot, vcenter: FabricRow) -> repo.ItemSnapshot:
    """Make the alternate vCenter the checks just passed the item's on-premises site, so that the
    reprotect job's tasks and the later failback work there too."""
    if vcenter.id == item.record.onprem_fabric:
        return item

    def change(row: ReplicatedItem, rec: ItemRecord) -> None:
        rec.onprem_fabric = row.source_fabric_id = vcenter.id

    return repo.update(item.id, change)


def _master_target_fabric(s: Session, item: repo.ItemSnapshot, master_target: str) -> str:
    """RP-VCENTER's default: the on-premises fabric whose last discovery holds the master target's
    VM. "" (the item's own site) when that site holds it, or when no fabric does — the checks then
    say so with `mt-not-discovered`."""
    mt = repo.component(s, master_target, ComponentKind.MASTER_TARGET)
    if mt is None or not mt.machine:
        return ""
    holders = [
        row.id
        for row in s.scalars(select(FabricRow).order_by(FabricRow.name))
        if (inventory := recorded(row)).kind is not SiteKind.CLOUD and inventory.holds(mt.machine)
    ]
    if not holders or item.record.onprem_fabric in holders:
        return ""
    return holders[0]


@router.post("/{ident}/reprotect", status_code=202, response_model=None)
def reprotect(
    ident: str,
    body: ReprotectBody,
    _: Principal = Depends(operator),
    s: Session = Depends(session, scope="function"),
) -> Started | Readiness:
    """RPW-1..7. With `what_if`, every failing prerequisite is listed and nothing changes."""
    item = _item_for_dr(s, ident)
    to_cloud = item.direction is Direction.FAILBACK
    if not to_cloud and is_azure(current(), item.record.cloud_fabric):
        return _azure_reprotect(s, item, body)
    if not to_cloud and not body.vcenter:
        body = body.model_copy(update={"vcenter": _master_target_fabric(s, item, body.master_target)})
    args = body.model_dump()
    typed = ReprotectArgs.model_validate(args)
    if to_cloud:
        problems = forward_problems(item, typed) + reprotect_capture_problems(s, item)
        notes: list[PlannedTask] = []
    else:
        ctx = build_reprotect_context(item, typed)
        problems = check_reprotect(ctx) + libvirt_reprotect_problems(s, item, args)
        problems += reprotect_capture_problems(s, item)  # LV-CAPTURE: the recovery domain's agent
        notes = plan_notes(ctx)
    if body.what_if:
        return Readiness(ready=not problems, problems=[ProblemItem.of(p) for p in problems], notes=notes)
    if problems:
        raise SiteRecoveryError(problems)
    if body.vcenter and not to_cloud:
        item = _fail_back_to(item, _fabric(s, body.vcenter))
    policy = repo.policy(s, item.policy_id)
    next_policy = (policy.failback_policy_id if not to_cloud else policy.forward_policy_id) or policy.id
    request = ops.ProtectRequest(
        body.master_target, body.process_server, body.datastore, body.retention_volume
    )
    return _start("reprotect", item, ops.reprotect_tasks(item, request, next_policy), args)


def _azure_reprotect(s: Session, item: repo.ItemSnapshot, body: ReprotectBody) -> Started | Readiness:
    """Reprotect from an Azure site: agentless (dr/azure_failback.py), its own prerequisites."""
    problems = azure_way_back_problems(item) + (azure_agent_problems(item) if body.agent else [])
    if body.what_if:
        return Readiness(ready=not problems, problems=[ProblemItem.of(p) for p in problems], notes=[])
    if problems:
        raise SiteRecoveryError(problems)
    policy = repo.policy(s, item.policy_id)
    tasks = azure_reprotect_tasks(item, policy.failback_policy_id or policy.id)
    return _start("reprotect", item, tasks, body.model_dump())


@router.post("/{ident}/failback", status_code=202, response_model=None)
def failback(
    ident: str,
    body: FailbackBody,
    _: Principal = Depends(operator),
    s: Session = Depends(session, scope="function"),
) -> Started | Readiness:
    """FB-1: planned failover to on-premises, after every failback rule passed."""
    item = _item_for_dr(s, ident)
    rep = item.record.replication
    args = ReprotectArgs(
        master_target=rep.master_target if rep else "", process_server=rep.process_server if rep else ""
    )
    azure = is_azure(current(), item.record.cloud_fabric)
    problems = azure_way_back_problems(item) if azure else check_failback(build_situation(item, args))
    if body.what_if:
        return Readiness(ready=not problems, problems=[ProblemItem.of(p) for p in problems])
    if problems:
        raise SiteRecoveryError(problems)
    tasks = ops.failover_tasks(item, ops.FailoverRequest(body.point, planned=True), failback=True)
    return _start("failback", item, tasks, body.model_dump())


@router.post("/{ident}/disable", status_code=202)
def disable(
    ident: str, _: Principal = Depends(operator), s: Session = Depends(session, scope="function")
) -> Started:
    item = repo.snapshot(repo.get_item(s, ident))
    return _start("disable", item, ops.disable_tasks(item), {})
