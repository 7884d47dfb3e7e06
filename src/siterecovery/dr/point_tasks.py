"""Task handlers that choose recovery points: failover to a point, test failover and its clean-up."""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any

from siterecovery.dr import items as repo
from siterecovery.dr import waits
from siterecovery.dr.guest import adopt_log, await_verdict
from siterecovery.dr.recovery_points import LATEST, ItemPoint, item_points, resolve
from siterecovery.errors import Problem, SiteRecoveryError, recovery_point_unusable, recovery_verdict_failed
from siterecovery.fabrics.base import DiskSpec, IpMode, MachineSpec, Nic, PowerState
from siterecovery.store.context import current
from siterecovery.store.jobs import TaskContext, task_handler
from siterecovery.store.record import ItemRecord, Replication, Site, TestCopy, TestFailover

POINT_TIMEOUT = 300.0


def _points(rep: Replication) -> list[ItemPoint]:
    with current().db.session() as s:
        return item_points(s, rep)


def _replication(item: repo.ItemSnapshot) -> Replication:
    if item.record.replication is None:
        raise SiteRecoveryError(
            Problem(
                "replication-missing",
                f"Item {item.name} is not replicating.",
                "Enable or reprotect it first.",
            )
        )
    return item.record.replication


@task_handler("apply-point")
def apply_point(ctx: TaskContext) -> dict[str, Any]:
    """Roll the target disks to the chosen point in place: O(bytes written since), O(1) for latest."""
    item = repo.load(ctx.args["item"])
    rep = _replication(item)
    wanted = str(ctx.args.get("point", LATEST))
    if wanted == LATEST and not rep.points:
        return {"point": LATEST}
    point = resolve(_points(rep), wanted) if not rep.points else None
    target = rep.points or ({} if point is None or point.id == LATEST else dict(point.disks))

    def change(_: Any, rec: ItemRecord) -> None:
        assert rec.replication is not None
        rec.replication.points = target
        rec.failover_point = {
            **rec.failover_point,
            "point": point.id if point else wanted,
            "point_time": point.time if point else None,
        }

    repo.update(item.id, change)
    if target:
        wait_at_point(rep.master_target, target)
    return {"point": point.id if point else wanted, "disks": target}


def wait_at_point(mt_id: str, target: dict[str, str]) -> None:
    """Wait until the master target reports every pair materialised at its point id."""

    def at_point() -> bool:
        pairs = {p.pair_id: p for p in waits.mt_pairs(mt_id).pairs}
        for pid in target:
            if pid in pairs and pairs[pid].paused == "recovery-point-unusable":
                # A damaged journal record on the way back (the master target refused before moving).
                raise recovery_point_unusable(target[pid], pid, "the master target found its journal damaged")
        if any(pairs[pid].paused == "recovery-point-unavailable" for pid in target if pid in pairs):
            raise SiteRecoveryError(
                Problem(
                    "recovery-point-unavailable",
                    "The master target no longer retains that point.",
                    "Choose a newer point.",
                )
            )
        return all(pid in pairs and pairs[pid].position == pt for pid, pt in target.items())

    waits.wait_until(
        at_point,
        POINT_TIMEOUT,
        "point-timeout",
        "The master target did not reach the point.",
        "Check the master target (`servers show`), then retry.",
    )


@task_handler("test-copy")
def test_copy(ctx: TaskContext) -> dict[str, Any]:
    """Test failover: copies of the disks at the point, while replication goes on (FW-2)."""
    item = repo.load(ctx.args["item"])
    rep = _replication(item)
    test = item.record.test
    if test is None:
        point = resolve(_points(rep), str(ctx.args.get("point", LATEST)))
        folder = Path(item.record.disks[0].cloud_path).parent / "test-failover"
        labels = {p.pair_id: p.disk for p in rep.pairs}
        test = TestFailover(
            point=point.id,
            machine=f"{item.record.machine}-test",
            copies=[
                TestCopy(
                    request_id=uuid.uuid4().hex[:12],
                    pair_id=pid,
                    point=pt,
                    label=labels[pid],
                    out_path=str(folder / f"{labels[pid]}.img"),
                )
                for pid, pt in point.disks.items()
            ],
        )
        Path(folder).mkdir(parents=True, exist_ok=True)

        def change(_: Any, rec: ItemRecord) -> None:
            rec.test = test

        repo.update(item.id, change)
    wanted = {c.request_id for c in test.copies}

    def copied() -> bool:
        done = {
            c.request_id: c for c in waits.mt_pairs(rep.master_target).copies_done if c.request_id in wanted
        }
        failed = [c for c in done.values() if not c.ok]
        if failed:
            raise SiteRecoveryError(
                Problem(
                    "test-copy-failed",
                    f"Copying a disk at the point failed: {failed[0].error}",
                    "Choose another point and run the test failover again.",
                )
            )
        ctx.progress(percent=100.0 * len(done) / len(wanted))
        return len(done) == len(wanted)

    waits.wait_until(
        copied,
        POINT_TIMEOUT,
        "test-copy-timeout",
        "The master target did not copy the disks.",
        "Check the master target (`servers show`), then retry.",
    )
    return {"point": test.point, "copies": [c.out_path for c in test.copies]}


@task_handler("start-test-machine")
def start_test_machine(ctx: TaskContext) -> dict[str, Any]:
    """An isolated, disposable machine on the copies; the protected item is not touched."""
    item = repo.load(ctx.args["item"])
    test = item.record.test
    if test is None:
        raise SiteRecoveryError(
            Problem(
                "test-missing",
                f"Item {item.name} has no test failover copies.",
                "Run the test failover again.",
            )
        )
    fabric = repo.site_fabric(item.record, Site.CLOUD)
    if fabric.discover().machine(test.machine) is None:
        fabric.create_machine(
            MachineSpec(
                name=test.machine,
                host="",
                datastore=item.record.cloud_resource_group,
                os_type=item.record.os_type,  # type: ignore[arg-type]
                disks=tuple(
                    DiskSpec(c.label, Path(c.out_path).stat().st_size, c.out_path) for c in test.copies
                ),
                nics=tuple(Nic(n.name, n.mac, IpMode.DHCP, network="isolated") for n in item.record.nics),
            )
        )
        adopt_log(fabric, test.machine, item.record.machine)
    since = time.time()
    repo.set_power(fabric, test.machine, PowerState.ON)
    verdict = await_verdict(fabric, test.machine, since)

    def change(_: Any, rec: ItemRecord) -> None:
        rec.oracle["test"] = verdict

    repo.update(item.id, change)
    if verdict.get("observable", True) and not verdict.get("ok", True):
        # The test machine stays for inspection (`items test-cleanup` removes it); the job fails.
        raise recovery_verdict_failed(test.machine, "cloud (test)", str(verdict.get("reason", "?")))
    return {"machine": test.machine, "oracle": verdict}


@task_handler("test-cleanup")
def test_cleanup(ctx: TaskContext) -> dict[str, Any]:
    item = repo.load(ctx.args["item"])
    test = item.record.test
    if test is None:
        return {"cleaned": False}
    fabric = repo.site_fabric(item.record, Site.CLOUD)
    if fabric.discover().machine(test.machine) is not None:
        fabric.power_off(test.machine)
        fabric.delete_machine(test.machine)
    for copy in test.copies:
        Path(copy.out_path).unlink(missing_ok=True)

    def change(_: Any, rec: ItemRecord) -> None:
        rec.test = None

    repo.update(item.id, change)
    return {"cleaned": True, "machine": test.machine}
