"""Changing the recovery point of a failover before it is committed (FW-2).

A real failover keeps what it needs to choose again: replication stops, but the master target
only closes the pairs' journals (`HeldFailover` in the item's record), and the recovery machine is
snapshotted before it first boots. Changing the point shuts the machine down, reverts the
snapshot (undoing everything it wrote, so its disks are exactly the old point again), lets the
master target hold the pairs again and roll their journals to the new point, releases them,
snapshots and boots the machine. Commit removes the snapshot; from then on the point is final.
These are the task handlers; `operations.change_point_tasks` orders them.
"""

from __future__ import annotations

from typing import Any

from siterecovery.dr import items as repo
from siterecovery.dr import waits
from siterecovery.dr.point_tasks import wait_at_point
from siterecovery.dr.recovery_points import item_points
from siterecovery.errors import Problem, SiteRecoveryError
from siterecovery.fabrics.base import Fabric, FabricError
from siterecovery.store.context import current
from siterecovery.store.jobs import TaskContext, task_handler
from siterecovery.store.record import HeldFailover, HeldPoint, ItemRecord, Replication, Site

SNAPSHOT_NAME = "siterecovery-before-commit"
HOLD_TIMEOUT = 300.0


def held_failover(rep: Replication) -> HeldFailover:
    """Replication stops for a failover: what to keep of it, with the points it had, until commit."""
    with current().db.session() as s:
        points = item_points(s, rep)
    return HeldFailover(
        replication=rep,
        site=rep.source_site.other,
        machine="",
        points=[HeldPoint(id=p.id, kind=p.kind, time=p.time, disks=dict(p.disks)) for p in points],
    )


def _held(item: repo.ItemSnapshot) -> HeldFailover:
    if item.record.held is None:
        raise SiteRecoveryError(
            Problem(
                "failover-not-held",
                f"Item {item.name} has no uncommitted failover whose point could change.",
                "Fail the item over again (points can change only between failover and commit).",
            )
        )
    return item.record.held


def _recovery_machine(item: repo.ItemSnapshot, site: Site) -> str:
    return item.record.machine if site is Site.ONPREM else (item.record.cloud_machine or item.record.machine)


@task_handler("snapshot-recovery-machine")
def snapshot_recovery_machine(ctx: TaskContext) -> dict[str, Any]:
    """Before the recovery machine boots: a snapshot its writes can be reverted to until commit."""
    item = repo.load(ctx.args["item"])
    held = _held(item)
    machine = _recovery_machine(item, held.site)
    fabric = repo.site_fabric(item.record, held.site)
    found = fabric.discover().machine(machine)
    existing = next((s for s in (found.snapshots if found else ()) if s.name == SNAPSHOT_NAME), None)
    try:
        snap_id = (existing or fabric.create_snapshot(machine, SNAPSHOT_NAME)).id
    except FabricError as exc:
        # libvirt's internal snapshots need qcow2 and the master target writes raw volumes: the
        # machine boots without one, and its point cannot change before commit (change-point says so).
        if exc.code != "libvirt-snapshot-unsupported":
            raise
        snap_id = ""

    def change(_: Any, rec: ItemRecord) -> None:
        assert rec.held is not None
        rec.held.machine, rec.held.snapshot = machine, snap_id

    repo.update(item.id, change)
    return {"machine": machine, "snapshot": snap_id}


def drop_snapshot(fabric: Fabric, machine: str, snapshot_id: str) -> None:
    """Remove the snapshot; one already gone (a replayed task) is fine."""
    try:
        fabric.remove_snapshot(machine, snapshot_id)
    except FabricError as exc:
        if exc.code != "snapshot-not-found":
            raise


@task_handler("revert-recovery-machine")
def revert_recovery_machine(ctx: TaskContext) -> dict[str, Any]:
    """Undo everything the recovery machine wrote: its disks are the failover's point again."""
    item = repo.load(ctx.args["item"])
    held = _held(item)
    if not held.snapshot:
        return {"reverted": False}
    fabric = repo.site_fabric(item.record, held.site)
    fabric.revert_to_snapshot(held.machine, held.snapshot)
    drop_snapshot(fabric, held.machine, held.snapshot)

    def change(_: Any, rec: ItemRecord) -> None:
        assert rec.held is not None
        rec.held.snapshot = ""

    repo.update(item.id, change)
    return {"reverted": True, "machine": held.machine}


@task_handler("attach-to-master-target")
def attach_to_master_target(ctx: TaskContext) -> dict[str, Any]:
    """Failback: the on-premises disks go back onto the master target VM for the roll."""
    item = repo.load(ctx.args["item"])
    fabric = repo.site_fabric(item.record, Site.ONPREM)
    mt_machine = str(ctx.args["mt_machine"])
    inv = fabric.discover()
    vm, mt = inv.machine(item.record.machine), inv.machine(mt_machine)
    on_mt = {d.uuid for d in (mt.disks if mt else ())}
    wanted = {d["uuid"] for d in item.record.placed_disks}
    to_attach = [d for d in (vm.disks if vm else ()) if d.uuid in wanted and d.uuid not in on_mt]
    if to_attach:
        fabric.attach_disks(mt_machine, to_attach)
    return {"attached": [d.uuid for d in to_attach]}


@task_handler("hold-at-point")
def hold_at_point(ctx: TaskContext) -> dict[str, Any]:
    """The master target holds the pairs again and rolls their journals to the chosen point."""
    item = repo.load(ctx.args["item"])
    held = _held(item)
    target = dict(ctx.args["disks"])

    def change(_: Any, rec: ItemRecord) -> None:
        assert rec.held is not None
        rec.held.attached = True
        rec.held.replication.points = target
        rec.failover_point = {
            **rec.failover_point,
            "point": ctx.args["point"],
            "point_time": ctx.args["time"],
        }

    repo.update(item.id, change)
    rep = held.replication
    if target:
        wait_at_point(rep.master_target, target)
    else:  # latest: the disks are rolled forward once the master target lists them at latest
        wait_at_point(rep.master_target, {p.pair_id: "latest" for p in rep.pairs})
    return {"point": ctx.args["point"], "disks": target}


@task_handler("release-held")
def release_held(ctx: TaskContext) -> dict[str, Any]:
    """The master target closes the journals again before the recovery machine uses the disks."""
    item = repo.load(ctx.args["item"])
    held = _held(item)

    def change(_: Any, rec: ItemRecord) -> None:
        assert rec.held is not None
        rec.held.attached = False

    repo.update(item.id, change)
    pair_ids = {p.pair_id for p in held.replication.pairs}
    waits.wait_until(
        lambda: not pair_ids & {p.pair_id for p in waits.mt_pairs(held.replication.master_target).pairs},
        HOLD_TIMEOUT,
        "detach-timeout",
        "The master target did not release the item's disks.",
        "Check that the master target is running (`servers list`), then retry.",
    )
    return {"released": sorted(pair_ids)}
