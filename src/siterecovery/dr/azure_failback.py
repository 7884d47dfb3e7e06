"""The way back from an Azure site, agentless: reprotect, failback and re-protect through the jobs.

A recovery VM in Azure runs no agent of ours, so the reprotect and failback jobs read its disks
the way the seed's agentless failback does: an incremental snapshot of each disk, the ranges that
changed since the base, read over the read access (SAS) ARM grants, written onto the on-premises
machine's disks, which are kept off meanwhile (RPW-5). The base is the snapshot the on-premises
disks were last made equal to (`ItemRecord.azure_base`): at the first sync, the failover's base
snapshot taken before the VM first booted when the failover was planned (the source's disks then
held exactly the replica), else nothing is assumed and each disk is compared with the on-premises
disk itself. Each sync takes a new snapshot (`<vm>-failback-sync-<id>`), sends what changed, then
makes it the base and deletes the older sync snapshots. A sync interrupted half-way (the
configuration server killed: the job resumes, or is run again) first completes the snapshot it was
writing, recorded before the first byte (`ItemRecord.azure_pending`), against the old base, then
syncs as usual. Protected in the failback direction, the item syncs when asked
(reprotect, and failback's last sync after the VM is deallocated): the RPO is the time since the
last sync, not continuous replication.

The on-premises disks are written by the configuration server through `copy_changes`, so they must
be files it can reach (a lab site; not yet a vSphere datastore behind a master target).
Re-protecting back to Azure deletes the old recovery VM (its disks, NICs and snapshots): the
replica page blobs become the target again, filled by a full synchronisation.
"""

from __future__ import annotations

import os
import signal
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from azure.storage.blob import BlobClient

from siterecovery.dataplane.changed_ranges import ContentCompare, DiffMethod, copy_changes
from siterecovery.dataplane.page_blob import STORAGE_API_VERSION
from siterecovery.dr import items as repo
from siterecovery.dr.azure_checks import check_onprem_route, check_sas
from siterecovery.errors import Problem, SiteRecoveryError
from siterecovery.fabrics.azure import FAILOVER_BASE, AzureFabric
from siterecovery.fabrics.azure_diff import DiffChoice, ManagedDiskDiff
from siterecovery.store.context import current
from siterecovery.store.events import record_event
from siterecovery.store.jobs import TaskContext, TaskSpec, task_handler
from siterecovery.store.record import ItemRecord, Site, StepMetric
from siterecovery.store.states import Direction, Severity

SYNC = "failback-sync"
# Tests only: "POINT:FLAG" kills the configuration server with SIGKILL at POINT while FLAG exists.
FAULT_KILL_AT = "SITERECOVERY_FAULT_KILL_AT"


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
    # The item's own sync snapshots may keep a read access a killed sync left open: the sync ends
    # it before reading, so only other exports (and the VM's disks) count (AZ-SAS-ACTIVE).
    ours = (f"{rec.cloud_machine}-{SYNC}-", f"{rec.cloud_machine}-{FAILOVER_BASE}-")
    active = [n for n in fabric.active_reads(vm.name) if not n.startswith(ours)] if vm is not None else []
    problems = check_sas(fabric.read_seconds, active)
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


def azure_agent_problems(item: repo.ItemSnapshot) -> list[Problem]:
    """A reprotect through an agent in the recovery VM (the seed's agent-based failback): its
    agent, process server and master target talk to the on-premises site, so the recovery network
    must route there (AZ-VPN, RP-REACH); the agentless way reads over SAS and needs no route. The
    agent-based data path from Azure is not built, so it is refused even when the route exists."""
    fabric = _fabric(item.record)
    problems = check_onprem_route(fabric.arm.gateway_connections(), fabric.subnet_id)
    problems.append(
        _problem(
            "azure-agent-failback-unsupported",
            "Reprotect from Azure through an agent in the recovery VM is not available: the agentless "
            "reprotect moves the data (incremental snapshots read over SAS).",
            "Reprotect without `agent` (agentless).",
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
        TaskSpec("Protect", "mark-protected", {**base, "direction": Direction.FAILBACK, "policy": policy_id}),
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
        TaskSpec("Failed over", "mark-failed-over", {**base, "direction": Direction.FAILBACK}),
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


def fault_point(point: str) -> None:
    """Tests only: kill -9 this process at `point` when FAULT_KILL_AT names it and its flag file
    exists (removed first, so the restarted server runs on). Unset in production: a no-op."""
    spec = os.environ.get(FAULT_KILL_AT, "")
    name, _, flag = spec.partition(":")
    if name != point or not flag:
        return
    try:
        os.unlink(flag)
    except FileNotFoundError:
        return
    os.kill(os.getpid(), signal.SIGKILL)


@dataclass
class _Moved:
    compared: int = 0
    sent: int = 0
    changed: int = 0


def _sync_to(fabric: AzureFabric, rec: ItemRecord, snapshot: str, base: str, service: bool) -> _Moved:
    """Write onto the on-premises disks what differs between `snapshot` and `base` (or, with no
    base, the on-premises disks themselves). Idempotent: run again, it writes the same bytes."""
    arm = fabric.arm
    moved = _Moved()
    positions = ["os", *(f"lun{i}" for i in range(len(rec.disks) - 1))]
    for position, disk in zip(positions, rec.disks, strict=True):
        new_name = f"{snapshot}-{position}"
        old_name = f"{base}-{position}" if base else ""
        for name in (new_name, old_name):  # a killed sync's read access is still open: ours, ended
            if name:
                arm.end_snapshot_read(name)
        new = _blob(arm.snapshot_read_url(new_name, fabric.read_seconds))
        try:
            diff = ContentCompare()
            if old_name:
                old_url = arm.snapshot_read_url(old_name, fabric.read_seconds)
                try:
                    if service:  # the self-test found the service's diff exact (fabrics/azure_diff.py)
                        changes = ManagedDiskDiff().compare(new, old_url, disk.size)
                    else:
                        changes = diff.compare(new, _blob(old_url), disk.size)
                finally:
                    arm.end_snapshot_read(old_name)
            else:
                changes = diff.compare_file(new, Path(disk.onprem_path), disk.size)
            moved.sent += copy_changes(new, changes, Path(disk.onprem_path))
            moved.compared += diff.bytes_read
            moved.changed += sum(c.length for c in changes)
        finally:
            arm.end_snapshot_read(new_name)
    return moved


def _snapshot_exists(fabric: AzureFabric, snapshot: str) -> bool:
    return any(s.name.startswith(f"{snapshot}-") for s in fabric.arm.list_snapshots())


@task_handler("azure-sync")
def azure_sync(ctx: TaskContext) -> dict[str, Any]:
    """Make the on-premises disks equal to a new snapshot of the Azure VM's disks.

    The sync's snapshot is recorded (`azure_pending`) before any byte is written. A sync that died
    half-way (the configuration server killed, the job resumed or run again) first completes that
    snapshot against the unchanged base: the on-premises disks may hold part of it, and only
    finishing it makes them equal to a known snapshot again. Then it syncs as usual from there,
    so what the VM wrote since (or a failback's deallocated VM) is what lands.
    """
    item = repo.load(ctx.args["item"])
    rec = item.record
    fabric = _fabric(rec)
    vm = rec.cloud_machine
    planned_failover = bool(rec.failover_point.get("planned")) and rec.active_site is Site.CLOUD
    base = rec.azure_base or (f"{vm}-{FAILOVER_BASE}" if planned_failover else "")
    started = time.monotonic()
    choice, new_choice = fabric.diff_choice()
    if new_choice:
        _diff_event(fabric, choice)
    service = choice.method is DiffMethod.SERVICE
    moved = _Moved()
    resumed = ""
    if rec.azure_pending and _snapshot_exists(fabric, rec.azure_pending):
        resumed = rec.azure_pending
        first = _sync_to(fabric, rec, resumed, base, service)
        moved = _Moved(first.compared, first.sent, first.changed)
        base = resumed
        _record(item.id, base=resumed, pending="")
    snapshot = fabric.create_snapshot(vm, f"{SYNC}-{uuid.uuid4().hex[:8]}").id
    _record(item.id, pending=snapshot)
    last = _sync_to(fabric, rec, snapshot, base, service)
    fault_point("azure-sync-written")  # written, the base not moved yet
    moved.compared += last.compared
    moved.sent += last.sent
    moved.changed += last.changed
    metric = StepMetric(
        step=str(ctx.args.get("step", "agentless sync")),
        seconds=round(time.monotonic() - started, 2),
        bytes_changed=moved.changed,
        bytes_sent=moved.sent,
    )
    _record(item.id, base=snapshot, pending="", metric=metric)
    for snap in {
        s.name.rsplit("-", 1)[0] for s in fabric.arm.list_snapshots() if s.name.startswith(f"{vm}-{SYNC}-")
    }:
        if snap != snapshot:  # older syncs (and an interrupted one's) are no base any more
            fabric.remove_snapshot(vm, snap)
    return {"base": base or "on-premises disks", "snapshot": snapshot, "resumed": resumed,
            "bytes_changed": moved.changed, "bytes_sent": moved.sent,
            "bytes_compared": moved.compared, "diff": choice.method.value,
            "diff_reason": choice.reason}  # fmt: skip


def _diff_event(fabric: AzureFabric, choice: DiffChoice) -> None:
    with current().db.session() as s:
        message = f"Fabric {fabric.name}: failback finds changed ranges by {choice.method.value}"
        record_event(
            s, Severity.INFO, "azure-diff-method", f"{message} ({choice.reason}).", "fabric", fabric.name
        )


def _record(item_id: str, *, base: str | None = None, pending: str | None = None,
            metric: StepMetric | None = None) -> None:  # fmt: skip
    def change(_: Any, r: ItemRecord) -> None:
        if base is not None:
            r.azure_base = base
        if pending is not None:
            r.azure_pending = pending
        if metric is not None:
            r.metrics.append(metric)

    repo.update(item_id, change)


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

    _record(item.id, base="", pending="")
    return {"deleted": vm}
