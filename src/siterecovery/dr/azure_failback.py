"""The way back from an Azure site, agentless: reprotect, failback and re-protect through the jobs.

A recovery VM in Azure runs no agent of ours, so the reprotect and failback jobs read its disks
the way the seed's agentless failback does: an incremental snapshot of each disk, the ranges that
changed since the base, read over the read access (SAS) ARM grants, written onto the on-premises
machine's disks, which are kept off meanwhile (RPW-5). The base is the snapshot the on-premises
disks were last made equal to (`ItemRecord.azure_base`): at the first sync, the failover's base
snapshot taken before the VM first booted when the failover was planned (the source's disks then
held exactly the replica), else nothing is assumed and each disk is compared with the on-premises
disk itself. Each sync takes a new snapshot (`<vm>-failback-sync-<id>`), sends what changed, then
makes it the base and deletes the older sync snapshots, so a sync interrupted half-way is simply
run again against the old base. Protected in the failback direction, the item syncs when asked
(reprotect, and failback's last sync after the VM is deallocated): the RPO is the time since the
last sync, not continuous replication.

The on-premises disks are written by the configuration server through `copy_changes`, so they must
be files it can reach (a lab site; not yet a vSphere datastore behind a master target).
Re-protecting back to Azure deletes the old recovery VM (its disks, NICs and snapshots): the
replica page blobs become the target again, filled by a full synchronisation.
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any

from azure.storage.blob import BlobClient

from siterecovery.dataplane.changed_ranges import ContentCompare, copy_changes
from siterecovery.dataplane.page_blob import STORAGE_API_VERSION
from siterecovery.dr import items as repo
from siterecovery.dr.azure_checks import check_sas
from siterecovery.errors import Problem, SiteRecoveryError
from siterecovery.fabrics.azure import FAILOVER_BASE, AzureFabric
from siterecovery.store.jobs import TaskContext, TaskSpec, task_handler
from siterecovery.store.record import ItemRecord, Site, StepMetric
from siterecovery.store.states import Direction

SYNC = "failback-sync"


def _fabric(rec: ItemRecord) -> AzureFabric:
    fabric = repo.site_fabric(rec, Site.CLOUD)
    if not isinstance(fabric, AzureFabric):
        raise TypeError("the item's cloud fabric is not an Azure fabric")
    return fabric


def _problem(code: str, message: str, remediation: str) -> Problem:
    return Problem(code, message, remediation)


def azure_way_back_problems(item: repo.ItemSnapshot) -> list[Problem]:
    """Every reason a reprotect or failback from Azure cannot run, at once."""
    rec = item.record
    fabric = _fabric(rec)
    vm = fabric.discover().machine(rec.cloud_machine)
    problems = check_sas(fabric.read_seconds, fabric.active_reads(vm.name) if vm is not None else ())
    if vm is None:
        problems.append(
            _problem(
                "azure-recovery-vm-missing",
                f"Resource group {rec.cloud_resource_group or '?'} has no recovery VM {rec.cloud_machine}.",
                "Nothing runs in Azure to bring back; disable protection or fail over again.",
            )
        )
    elif len(vm.disks) != len(rec.disks):
        problems.append(
            _problem(
                "azure-disks-changed",
                f"VM {vm.name} has {len(vm.disks)} disks; {len(rec.disks)} were failed over.",
                "Detach the added disks (or attach the removed ones) before reprotecting.",
            )
        )
    onprem = repo.site_fabric(rec, Site.ONPREM).discover().machine(rec.machine)
    if onprem is None:
        problems.append(
            _problem(
                "azure-onprem-machine-missing",
                f"The on-premises machine {rec.machine} is gone; agentless failback writes onto its disks.",
                "Restore the on-premises machine (its disks), then reprotect.",
            )
        )
    for disk in rec.disks:
        path = Path(disk.onprem_path)
        if not path.is_file() or path.stat().st_size < disk.size:
            problems.append(
                _problem(
                    "azure-onprem-disk-unreachable",
                    f"Disk {disk.label} of {rec.machine} is not a file of {disk.size} bytes the "
                    f"configuration server can write ({path}).",
                    "Failback from Azure writes the on-premises disks from the configuration server: "
                    "run it beside a lab site, or reprotect through an agent in the Azure VM.",
                )
            )
    return problems


# ---- task lists ---------------------------------------------------------------------------------


def azure_reprotect_tasks(item: repo.ItemSnapshot, policy_id: str) -> list[TaskSpec]:
    base = {"item": item.id}
    return [
        TaskSpec("Check prerequisites (agentless failback from Azure)", "azure-way-back-check", base),
        TaskSpec(
            "Power off on-premises machine (RPW-5)",
            "power-off-target",
            {**base, "source_site": Site.CLOUD.value},
        ),
        TaskSpec(
            "Synchronise differences from the Azure VM's disks",
            "azure-sync",
            {**base, "step": "reprotect cloud → on-premises (agentless)"},
        ),
        TaskSpec(
            "Protect", "mark-protected", {**base, "direction": Direction.FAILBACK.value, "policy": policy_id}
        ),
    ]


def azure_failback_tasks(item: repo.ItemSnapshot, point: str, planned: bool) -> list[TaskSpec]:
    base = {"item": item.id, "planned": planned}
    tasks = [
        TaskSpec("Begin", "failover-begin", {**base, "point": point}),
        TaskSpec("Check prerequisites (agentless failback from Azure)", "azure-way-back-check", base),
    ]
    if planned:
        tasks.append(
            TaskSpec("Deallocate the Azure VM", "shutdown-source", {**base, "source_site": Site.CLOUD.value})
        )
    onprem = Site.ONPREM.value
    return [
        *tasks,
        TaskSpec(
            "Last differences from the Azure VM's disks",
            "azure-sync",
            {**base, "step": "failback: last sync"},
        ),
        TaskSpec(
            "Start onprem machine",
            "start-recovery-machine",
            {**base, "target_site": onprem, "step": "failback to on-premises"},
        ),
        TaskSpec("Network and guest checks", "post-failover-checks", {**base, "target_site": onprem}),
        TaskSpec("Failed over", "mark-failed-over", {**base, "direction": Direction.FAILBACK.value}),
        TaskSpec("Verify the recovered guest", "verify-recovery", {**base, "target_site": onprem}),
    ]


def retire_task(item: repo.ItemSnapshot) -> TaskSpec:
    """Re-protect toward Azure: the old recovery VM goes, the replica blobs are the target again."""
    return TaskSpec("Delete the old Azure recovery VM", "azure-retire-recovery-vm", {"item": item.id})


# ---- handlers -----------------------------------------------------------------------------------


@task_handler("azure-way-back-check")
def way_back_check(ctx: TaskContext) -> dict[str, Any]:
    problems = azure_way_back_problems(repo.load(ctx.args["item"]))
    if problems:
        raise SiteRecoveryError(problems)
    return {"ready": True}


def _blob(url: str) -> BlobClient:
    return BlobClient.from_blob_url(url, api_version=STORAGE_API_VERSION)


@task_handler("azure-sync")
def azure_sync(ctx: TaskContext) -> dict[str, Any]:
    """Make the on-premises disks equal to a new snapshot of the Azure VM's disks."""
    item = repo.load(ctx.args["item"])
    rec = item.record
    fabric = _fabric(rec)
    vm = rec.cloud_machine
    planned_failover = bool(rec.failover_point.get("planned")) and rec.active_site is Site.CLOUD
    base = rec.azure_base or (f"{vm}-{FAILOVER_BASE}" if planned_failover else "")
    started = time.monotonic()
    snapshot = fabric.create_snapshot(vm, f"{SYNC}-{uuid.uuid4().hex[:8]}").id
    positions = ["os", *(f"lun{i}" for i in range(len(rec.disks) - 1))]
    compared = sent = changed = 0
    arm = fabric.arm
    for position, disk in zip(positions, rec.disks, strict=True):
        new_name = f"{snapshot}-{position}"
        new = _blob(arm.snapshot_read_url(new_name, fabric.read_seconds))
        try:
            diff = ContentCompare()
            if base:
                old_name = f"{base}-{position}"
                old = _blob(arm.snapshot_read_url(old_name, fabric.read_seconds))
                try:
                    changes = diff.compare(new, old, disk.size)
                finally:
                    arm.end_snapshot_read(old_name)
            else:
                changes = diff.compare_file(new, Path(disk.onprem_path), disk.size)
            sent += copy_changes(new, changes, Path(disk.onprem_path))
            compared += diff.bytes_read
            changed += sum(c.length for c in changes)
        finally:
            arm.end_snapshot_read(new_name)

    def change(_: Any, r: ItemRecord) -> None:
        r.azure_base = snapshot
        r.metrics.append(
            StepMetric(
                step=str(ctx.args.get("step", "agentless sync")),
                seconds=round(time.monotonic() - started, 2),
                bytes_changed=changed,
                bytes_sent=sent,
            )
        )

    repo.update(item.id, change)
    for snap in {
        s.name.rsplit("-", 1)[0] for s in arm.list_snapshots() if s.name.startswith(f"{vm}-{SYNC}-")
    }:
        if snap != snapshot:  # older syncs (and an interrupted one's) are no base any more
            fabric.remove_snapshot(vm, snap)
    return {"base": base or "on-premises disks", "snapshot": snapshot, "bytes_changed": changed,
            "bytes_sent": sent, "bytes_compared": compared}  # fmt: skip


@task_handler("azure-retire-recovery-vm")
def retire_recovery_vm(ctx: TaskContext) -> dict[str, Any]:
    item = repo.load(ctx.args["item"])
    fabric = _fabric(item.record)
    vm = item.record.cloud_machine
    if fabric.discover().machine(vm) is None:
        return {"deleted": None}  # replayed after it finished
    fabric.power_off(vm)
    fabric.remove_snapshot(vm, f"{vm}-{SYNC}")
    fabric.delete_machine(vm)

    def change(_: Any, r: ItemRecord) -> None:
        r.azure_base = ""

    repo.update(item.id, change)
    return {"deleted": vm}
