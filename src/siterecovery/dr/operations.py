"""Each DR operation as an ordered list of visible tasks, after checking the item's state.

The item API and recovery plans both build jobs from these lists, so a plan shows every
machine's tasks in its boot-group order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from siterecovery.dataplane.assignments import SyncMode
from siterecovery.dr import items as repo
from siterecovery.dr.azure_failback import azure_failback_tasks, azure_reprotect_tasks, retire_task
from siterecovery.dr.azure_jobs import is_azure
from siterecovery.dr.libvirt_capture import capture_tasks, release_tasks
from siterecovery.dr.recovery_points import LATEST, held_points, resolve
from siterecovery.errors import Problem, SiteRecoveryError
from siterecovery.store.context import current
from siterecovery.store.jobs import TaskSpec
from siterecovery.store.models import Component
from siterecovery.store.record import Site
from siterecovery.store.states import ComponentKind, Direction, ProtectionState


@dataclass(frozen=True)
class FailoverRequest:
    point: str = "latest"
    planned: bool = False


@dataclass(frozen=True)
class ProtectRequest:
    master_target: str
    process_server: str
    datastore: str = ""
    retention_volume: str = ""
    via_plan: bool = False
    group_master_targets: tuple[tuple[str, str], ...] = ()


def _state_error(item: repo.ItemSnapshot, wanted: str, remediation: str) -> SiteRecoveryError:
    return SiteRecoveryError(
        Problem(
            "invalid-state",
            f"Item {item.name} is {item.state.value} ({item.direction.value}); {wanted}.",
            remediation,
        )
    )


def _site_pair(direction: Direction) -> tuple[Site, Site]:
    """(source, target) sites of replication in this direction."""
    return (Site.ONPREM, Site.CLOUD) if direction is Direction.FORWARD else (Site.CLOUD, Site.ONPREM)


def enable_tasks(
    item_id: str, process_server: str, master_target: str, policy_id: str, retention_volume: str
) -> list[TaskSpec]:
    base = {"item": item_id}
    # A libvirt domain's disks become its agent's exports before anything is copied.
    return [
        *capture_tasks(repo.load(item_id).record, item_id, Site.ONPREM),
        TaskSpec(
            "Start replication",
            "replication-start",
            {
                **base,
                "source_site": Site.ONPREM.value,
                "sync_mode": SyncMode.FULL.value,
                "process_server": process_server,
                "master_target": master_target,
                "retention_volume": retention_volume,
            },
        ),
        TaskSpec("Initial replication", "replication-sync", {**base, "step": "enable: initial replication"}),
        TaskSpec("Protect", "mark-protected", {**base, "direction": Direction.FORWARD, "policy": policy_id}),
    ]


def failover_tasks(
    item: repo.ItemSnapshot, request: FailoverRequest, *, failback: bool = False
) -> list[TaskSpec]:
    if item.state is ProtectionState.FAILED_OVER and item.record.held is not None:
        raise _state_error(
            item,
            "it is already failed over (not committed)",
            f"To boot it from another point, run `items change-point {item.name} --point P`; "
            f"to keep this one, `items commit {item.name}`.",
        )
    agentless = failback and is_azure(current(), item.record.cloud_fabric)  # dr/azure_failback.py
    if item.state is not ProtectionState.PROTECTED or (item.record.replication is None and not agentless):
        raise _state_error(item, "only a protected item can fail over", "Enable or reprotect it first.")
    if failback != (item.direction is Direction.FAILBACK):
        wanted = "failback" if item.direction is Direction.FAILBACK else "failover"
        raise _state_error(item, f"use {wanted} for this direction", f"Run `items {wanted}`.")
    if agentless:
        return azure_failback_tasks(item, request.point, request.planned)
    source, target = _site_pair(item.direction)
    rep = item.record.replication
    assert rep is not None
    base = {"item": item.id, "planned": request.planned}
    step = "failback to on-premises" if failback else "failover to cloud"
    tasks = [TaskSpec("Begin", "failover-begin", {**base, "point": request.point})]
    if target is Site.CLOUD and is_azure(current(), item.record.cloud_fabric):
        # Refused here, the item stays protected and the failover can be run again.
        tasks.append(TaskSpec("Check Azure prerequisites (AZ-*)", "azure-failover-check", base))
    if request.planned:
        tasks += [
            TaskSpec(
                f"Shut down {source.value} machine", "shutdown-source", {**base, "source_site": source.value}
            ),
            TaskSpec("Drain replication (no data loss)", "drain", base),
        ]
    tasks += [
        TaskSpec(f"Apply recovery point {request.point}", "apply-point", {**base, "point": request.point}),
        TaskSpec("Stop replication (journals kept until commit)", "stop-replication", {**base, "hold": True}),
    ]
    if target is Site.CLOUD:
        tasks.append(TaskSpec("Create recovery machine in the cloud", "create-recovery-machine", base))
    else:
        tasks.append(_detach_from_mt(base, rep.master_target))
    tasks += _boot_recovery_machine(base, target, step)
    tasks.append(TaskSpec("Failed over", "mark-failed-over", {**base, "direction": item.direction.value}))
    tasks.append(_verify(base, target))
    return tasks


def _verify(base: dict[str, Any], target: Site) -> TaskSpec:
    # Last, so a failed guest check fails the job (with the verdict) instead of ending "succeeded".
    return TaskSpec("Verify the recovered guest", "verify-recovery", {**base, "target_site": target.value})


def _detach_from_mt(base: dict[str, Any], mt_id: str) -> TaskSpec:
    return TaskSpec(
        "Detach disks from master target",
        "detach-from-master-target",
        {**base, "mt_machine": _mt_machine(mt_id)},
    )


def _boot_recovery_machine(base: dict[str, Any], target: Site, step: str) -> list[TaskSpec]:
    return [
        TaskSpec(
            f"Snapshot {target.value} machine (the point can change until commit)",
            "snapshot-recovery-machine",
            base,
        ),
        TaskSpec(
            f"Start {target.value} machine",
            "start-recovery-machine",
            {**base, "target_site": target.value, "step": step},
        ),
        TaskSpec("Network and guest checks", "post-failover-checks", {**base, "target_site": target.value}),
    ]


def change_point_tasks(item: repo.ItemSnapshot, point: str, *, via_plan: bool = False) -> list[TaskSpec]:
    """FW-2: before commit, boot the recovery machine again from another retained point.

    Members of a replication group run from one common point (RP-GROUP-MT), so theirs changes
    together, through a recovery plan.
    """
    if item.group_id is not None and not via_plan:
        raise SiteRecoveryError(
            Problem(
                "group-point-via-plan",
                f"Item {item.name} is in a replication group, whose members must run from one common point.",
                "Change the point of the whole group through its recovery plan "
                "(`plans change-point PLAN --point TAG`, a group point every member has).",
            )
        )
    held = item.record.held
    if item.state is not ProtectionState.FAILED_OVER or held is None:
        raise _state_error(
            item,
            "only a failed-over item that is not committed can change its recovery point",
            "Fail the item over first; after `items commit` the point is final.",
        )
    if held.machine and not held.snapshot:
        raise SiteRecoveryError(
            Problem(
                "change-point-unavailable",
                f"Recovery machine {held.machine} booted without a snapshot (its site cannot snapshot "
                "its disks, e.g. a libvirt domain on an agent's NBD export), so its point cannot "
                "change before commit.",
                f"Commit this point (`items commit {item.name}`), or fail over again after a reprotect.",
            )
        )
    chosen = resolve(held_points(held), point)
    target = held.site
    mt_id = held.replication.master_target
    base = {"item": item.id, "planned": False}
    tasks = [
        TaskSpec("Begin", "failover-begin", {**base, "point": chosen.id}),
        TaskSpec(
            f"Shut down {target.value} machine", "shutdown-source", {**base, "source_site": target.value}
        ),
        TaskSpec("Revert to the snapshot taken before boot", "revert-recovery-machine", base),
    ]
    if target is Site.ONPREM:
        tasks.append(
            TaskSpec(
                "Attach disks to master target",
                "attach-to-master-target",
                {**base, "mt_machine": _mt_machine(mt_id)},
            )
        )
    disks = {} if chosen.id == LATEST else dict(chosen.disks)
    tasks += [
        TaskSpec(
            f"Apply recovery point {chosen.id}",
            "hold-at-point",
            {**base, "point": chosen.id, "time": chosen.time, "disks": disks},
        ),
        TaskSpec("Release disks from master target", "release-held", base),
    ]
    if target is Site.ONPREM:
        tasks.append(_detach_from_mt(base, mt_id))
    tasks += _boot_recovery_machine(base, target, f"change recovery point to {chosen.id}")
    tasks.append(_verify(base, target))
    return tasks


def _mt_machine(mt_id: str) -> str:
    with current().db.session() as s:
        row = s.get(Component, mt_id)
        return row.machine if row is not None else ""


def test_failover_tasks(item: repo.ItemSnapshot, point: str) -> list[TaskSpec]:
    if item.state is not ProtectionState.PROTECTED or item.record.replication is None:
        raise _state_error(
            item, "only a protected item can be test-failed-over", "Enable or reprotect it first."
        )
    if item.record.test is not None:
        raise _state_error(
            item,
            f"test machine {item.record.test.machine} still exists",
            "Clean the last test failover up first (`items test-cleanup`).",
        )
    if is_azure(current(), item.record.cloud_fabric):
        raise SiteRecoveryError(
            Problem(
                "test-failover-unsupported",
                f"Item {item.name} replicates to an Azure fabric, whose page-blob replicas keep no "
                "recovery points for the master target to copy a test machine's disks from.",
                "Test the recovery with a planned failover in a maintenance window, or replicate to a "
                "lab or libvirt site for test failovers.",
            )
        )
    base = {"item": item.id, "point": point}
    return [
        TaskSpec(f"Copy disks at recovery point {point}", "test-copy", base),
        TaskSpec("Start isolated test machine", "start-test-machine", base),
    ]


def test_cleanup_tasks(item: repo.ItemSnapshot) -> list[TaskSpec]:
    if item.record.test is None:
        raise _state_error(
            item, "there is no test failover to clean up", "Run `items failover --test` first."
        )
    return [TaskSpec("Delete test machine and its disks", "test-cleanup", {"item": item.id})]


def commit_tasks(item: repo.ItemSnapshot) -> list[TaskSpec]:
    if item.state is not ProtectionState.FAILED_OVER:
        raise _state_error(item, "only a failed-over item can be committed", "Fail it over first.")
    return [TaskSpec("Commit", "commit", {"item": item.id})]


def reprotect_tasks(item: repo.ItemSnapshot, request: ProtectRequest, policy_id: str) -> list[TaskSpec]:
    """RPW-1..7 (cloud → on-premises) or, after a failback, on-premises → cloud again (FB-2)."""
    if item.state is not ProtectionState.FAILOVER_COMMITTED:
        raise _state_error(
            item,
            "only a committed failover can be reprotected",
            "Fail over and commit first (`items failover`, `items commit`).",
        )
    source = Site.CLOUD if item.direction is Direction.FORWARD else Site.ONPREM
    direction = Direction.FAILBACK if source is Site.CLOUD else Direction.FORWARD
    azure = is_azure(current(), item.record.cloud_fabric)
    if azure and source is Site.CLOUD:
        return azure_reprotect_tasks(item, policy_id)  # agentless: no agent in the Azure VM
    args: dict[str, Any] = {
        "item": item.id,
        "source_site": source.value,
        "master_target": request.master_target,
        "process_server": request.process_server,
        "datastore": request.datastore,
        "retention_volume": request.retention_volume,
        "via_plan": request.via_plan,
        "group_master_targets": dict(request.group_master_targets),
    }
    mt_id = _component_id(request.master_target, "master-target")
    ps_id = _component_id(request.process_server, "process-server")
    tasks = [
        TaskSpec("Check prerequisites", "reprotect-check", args),
        TaskSpec(f"Power off {source.other.value} machine (RPW-5)", "power-off-target", args),
    ]
    if azure and source is Site.ONPREM:
        tasks.append(retire_task(item))
    if source is Site.CLOUD:
        tasks += [
            TaskSpec("Merge snapshots of on-premises machine (RP-VM-SNAP)", "merge-snapshots", args),
            TaskSpec(
                "Prepare on-premises disks on the master target (RPW-6)",
                "prepare-onprem-disks",
                {**args, "mt_machine": _mt_machine(mt_id)},
            ),
        ]
    tasks += capture_tasks(item.record, item.id, source)  # the new source domain's disks
    tasks += [
        TaskSpec(
            "Start replication",
            "replication-start",
            {**args, "process_server": ps_id, "master_target": mt_id, "sync_mode": "auto"},
        ),
        TaskSpec(
            "Synchronise differences",
            "replication-sync",
            {"item": item.id, "step": f"reprotect {source.value} → {source.other.value}"},
        ),
        TaskSpec(
            "Protect", "mark-protected", {"item": item.id, "direction": direction.value, "policy": policy_id}
        ),
    ]
    return tasks


def _component_id(ident: str, kind: str) -> str:
    with current().db.session() as s:
        row = repo.component(s, ident, ComponentKind(kind))
        return row.id if row is not None else ident


def disable_tasks(item: repo.ItemSnapshot) -> list[TaskSpec]:
    if item.state is ProtectionState.DISABLED:
        raise _state_error(item, "protection is already disabled", "Nothing to do.")
    tasks = []
    if item.record.replication is not None:
        tasks.append(TaskSpec("Stop replication", "stop-replication", {"item": item.id}))
    tasks += release_tasks(item.record, item.id)
    tasks.append(TaskSpec("Disable protection", "disable", {"item": item.id}))
    return tasks
