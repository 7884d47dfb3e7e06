"""Task handlers of the DR jobs: each is one visible, resumable step of a workflow.

Every handler is safe to run again after a crash of the configuration server (DBOS re-runs the
step that was interrupted): it checks what is already done before doing it.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from siterecovery.dataplane.assignments import SyncMode
from siterecovery.dr import items as repo
from siterecovery.dr import rules, waits
from siterecovery.dr.azure_jobs import ensure_azure_failover, is_page_blob
from siterecovery.dr.checks import ensure_reprotect
from siterecovery.dr.desired import agent_name
from siterecovery.dr.guest import await_verdict, guest_warnings, last_flushed
from siterecovery.dr.held_failover import drop_snapshot, held_failover
from siterecovery.dr.libvirt_capture import reprotect_capture_problems
from siterecovery.dr.placement import pair_id
from siterecovery.dr.platforms import define_recovery_domain, libvirt_reprotect_problems, recreate_domain
from siterecovery.dr.situation import ReprotectArgs, build_reprotect_context, forward_problems
from siterecovery.errors import Problem, SiteRecoveryError, recovery_verdict_failed
from siterecovery.fabrics.base import Disk, DiskSpec, IpMode, MachineSpec, Nic, OsType, PowerState
from siterecovery.retry import is_transient
from siterecovery.store.context import current
from siterecovery.store.jobs import TaskContext, task_handler
from siterecovery.store.record import ItemRecord, Pair, Replication, Site, StepMetric
from siterecovery.store.states import ComponentKind, Direction, ProtectionState


def sync_timeout() -> float:
    """Seconds enable waits for the initial sync (read when it waits, never at import time)."""
    return float(os.environ.get("SITERECOVERY_SYNC_TIMEOUT", "1800"))


def drain_deadline() -> float:
    """Seconds a planned failover waits for its drain (read each time, so it can change at runtime)."""
    return float(os.environ.get("SITERECOVERY_DRAIN_TIMEOUT", "300"))


def _agent_id(site: Site, machine: str) -> str:
    with current().db.session() as s:
        row = repo.component(s, agent_name(site.value, machine), ComponentKind.AGENT)
        if row is None:
            raise SiteRecoveryError(
                rules.AGENT_NOT_REGISTERED.refusal(
                    f"The agent of {machine} ({site.value}) has not registered yet.",
                    "Wait a few minutes for the machine's agent to register, then retry.",
                )
            )
        return row.id


def _metric(item_id: str, metric: StepMetric) -> None:
    def change(_: Any, rec: ItemRecord) -> None:
        rec.metrics.append(metric)

    repo.update(item_id, change)


# ---- enable (FW-1) and every later (re)synchronisation -------------------------------------


@task_handler("replication-start")
def start_replication(ctx: TaskContext) -> dict[str, Any]:
    """Point the item's replication at its target disks; the agent then syncs them (full or delta)."""
    item = repo.load(ctx.args["item"])
    source = Site(ctx.args["source_site"])
    if item.record.replication is not None and item.record.replication.source_site is source:
        return {"generation": item.record.replication.generation}  # already started (replayed step)
    generation = item.record.last_generation + 1
    target = source.other
    created = item.record.target_created
    for disk in item.record.disks:
        if is_page_blob(disk.path(target)):
            continue  # an Azure replica: its master target creates the page blob (enable syncs it full)
        path = Path(disk.path(target))
        if not path.exists():  # a new target disk: created sparse, filled by a full sync
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "wb") as f:
                f.truncate(disk.size)
            created = True
    # Onto disks that already hold (an older copy of) the data only the differences move (RPW-6).
    wanted = str(ctx.args["sync_mode"])
    # Page blobs take full synchronisations only (no block digests of a blob on the master target).
    created = created or any(is_page_blob(d.path(target)) for d in item.record.disks)
    mode = (SyncMode.FULL if created else SyncMode.DELTA) if wanted == "auto" else SyncMode(wanted)
    machine = item.record.machine if source is Site.ONPREM else item.record.cloud_machine
    rep = Replication(
        source_site=source,
        source_machine=machine,
        process_server=ctx.args["process_server"],
        master_target=ctx.args["master_target"],
        retention_volume=ctx.args.get("retention_volume", ""),
        sync_mode=mode,
        generation=generation,
        pairs=[
            Pair(
                pair_id=pair_id(item.id, generation, d.label),
                disk=d.label,
                source=d.path(source),
                target=d.path(target),
                size=d.size,
            )
            for d in item.record.disks
        ],
    )

    def change(_: Any, rec: ItemRecord) -> None:
        rec.replication = rep
        rec.last_generation = generation
        rec.target_created = False

    repo.update(item.id, change)
    return {"generation": generation, "sync_mode": mode.value}


@task_handler("replication-sync")
def sync(ctx: TaskContext) -> dict[str, Any]:
    item = repo.load(ctx.args["item"])
    rep = item.record.replication
    if rep is None:
        raise SiteRecoveryError(
            Problem(
                "replication-missing",
                f"Item {item.name} has no replication to sync.",
                "Start replication first.",
            )
        )
    started = time.monotonic()
    agent = _agent_id(rep.source_site, rep.source_machine)
    pairs = waits.wait_for_sync(ctx, agent, [p.pair_id for p in rep.pairs], sync_timeout())
    sent = sum(p.bytes_sent for p in pairs)
    allocated = sum(p.bytes_total for p in pairs)
    _metric(
        item.id,
        StepMetric(
            step=ctx.args.get("step", f"{rep.sync_mode.value} sync"),
            seconds=round(time.monotonic() - started, 2),
            bytes_changed=allocated,
            bytes_sent=sent,
        ),
    )
    return {"bytes_sent": sent, "bytes_compared": allocated}


@task_handler("mark-protected")
def mark_protected(ctx: TaskContext) -> dict[str, Any]:
    direction = Direction(ctx.args["direction"])
    repo.set_state(ctx.args["item"], ProtectionState.PROTECTED, direction, ctx.args.get("policy"))
    return {"state": ProtectionState.PROTECTED, "direction": direction.value}


# ---- failover / failback (FW-2, FB-1) ------------------------------------------------------


def _machine_of(item: repo.ItemSnapshot, site: Site) -> str:
    return item.record.machine if site is Site.ONPREM else item.record.cloud_machine


@task_handler("failover-begin")
def failover_begin(ctx: TaskContext) -> dict[str, Any]:
    item = repo.load(ctx.args["item"])
    if item.record.failover_point.get("job") == ctx.job_id:
        return dict(item.record.failover_point)

    def change(_: Any, rec: ItemRecord) -> None:
        rec.failover_point = {
            "job": ctx.job_id,
            "started_at": time.time(),
            "point": ctx.args.get("point", "latest"),
            "planned": bool(ctx.args.get("planned")),
        }

    return dict(repo.update(item.id, change).record.failover_point)


@task_handler("azure-failover-check")
def azure_failover_check(ctx: TaskContext) -> dict[str, Any]:
    """AZ-*: before the source stops or replication is held, what ARM would refuse half-way."""
    item = repo.load(ctx.args["item"])
    ensure_azure_failover(repo.site_fabric(item.record, Site.CLOUD), item.record)
    return {"ready": True}


@task_handler("post-failover-checks")
def post_failover_checks(ctx: TaskContext) -> dict[str, Any]:
    """FB-3 / FB-4: compare the recovered machine with what was recorded; warn about what differs."""
    item = repo.load(ctx.args["item"])
    if Site(ctx.args["target_site"]) is not Site.ONPREM:
        return {"warnings": []}
    # The guest comes back with the configuration it had in the cloud.
    in_cloud = repo.site_fabric(item.record, Site.CLOUD).discover().machine(item.record.cloud_machine)
    warnings = guest_warnings(item.record, in_cloud)
    ctx.progress(message="; ".join(warnings) or "no issues found")
    return {"warnings": warnings}


@task_handler("shutdown-source")
def shutdown_source(ctx: TaskContext) -> dict[str, Any]:
    """Planned: shut the source machine down; its agent drains what it captured before it exits."""
    item = repo.load(ctx.args["item"])
    site = Site(ctx.args["source_site"])
    fabric = repo.site_fabric(item.record, site)
    machine = _machine_of(item, site)
    started = time.time()
    repo.set_power(fabric, machine, PowerState.OFF)
    flushed = last_flushed(fabric, machine)

    def change(_: Any, rec: ItemRecord) -> None:
        rec.failover_point = {**rec.failover_point, "shutdown_at": started, "source_flushed": flushed}

    repo.update(item.id, change)
    return {"shutdown_at": started, "source_flushed": flushed}


@task_handler("drain")
def drain(ctx: TaskContext) -> dict[str, Any]:
    """Wait until the master target applied everything the source's agent had acknowledged (no data loss)."""
    item = repo.load(ctx.args["item"])
    rep = item.record.replication
    if rep is None:
        return {"drained": "no replication"}
    agent = _agent_id(rep.source_site, rep.source_machine)
    final = waits.agent_pairs_acked(agent, current().config.heartbeat_timeout, drain_deadline())
    lost = [p.pair_id for p in final.values() if p.captured_seq > p.acked_seq]
    if lost and ctx.args.get("planned"):
        raise SiteRecoveryError(
            Problem(
                "drain-incomplete",
                f"The agent of {rep.source_machine} stopped with writes its process server "
                "never acknowledged, so a planned failover cannot promise no data loss.",
                "Start the source machine so its agent can send the rest, or run an unplanned failover.",
            )
        )
    targets = {p.pair_id: final[p.pair_id].acked_seq for p in rep.pairs if p.pair_id in final}
    waits.wait_for_apply(ctx, rep.master_target, targets, drain_deadline(), rep.source_machine)
    return {"drained_to": targets}


@task_handler("stop-replication")
def stop_replication(ctx: TaskContext) -> dict[str, Any]:
    """Detach the pairs from the master target; it closes their journals before the disks are used.

    A failover holds the stopped replication until commit (its journals stay on the retention
    volume), so the recovery point can still change (`held_failover.py`).
    """
    item = repo.load(ctx.args["item"])
    rep = item.record.replication
    if rep is None:
        return {"stopped": True}
    pair_ids = {p.pair_id for p in rep.pairs}
    held = held_failover(rep) if ctx.args.get("hold") else None

    def change(_: Any, rec: ItemRecord) -> None:
        rec.held = held or rec.held
        rec.replication = None

    repo.update(item.id, change)
    waits.wait_until(
        lambda: not pair_ids & {p.pair_id for p in waits.mt_pairs(rep.master_target).pairs},
        drain_deadline(),
        "detach-timeout",
        "The master target did not release the item's disks.",
        "Check that the master target is running (`servers list`), then retry.",
    )
    return {"stopped": True, "master_target": rep.master_target}


@task_handler("create-recovery-machine")
def create_recovery_machine(ctx: TaskContext) -> dict[str, Any]:
    """Failover to the cloud: a machine whose managed disks are the replica disks (O(1) for latest)."""
    item = repo.load(ctx.args["item"])
    fabric = repo.site_fabric(item.record, Site.CLOUD)
    name = item.record.cloud_machine or item.record.machine
    if fabric.discover().machine(name) is None and not define_recovery_domain(fabric, item.record, name):
        fabric.create_machine(
            MachineSpec(
                name=name,
                host="",
                datastore=item.record.cloud_resource_group,
                os_type=OsType(item.record.os_type),
                os_version=item.record.os_version,
                disks=tuple(DiskSpec(d.label, d.size, d.cloud_path) for d in item.record.disks),
                nics=tuple(Nic(n.name, n.mac, IpMode.DHCP) for n in item.record.nics),
            )
        )

    created = fabric.discover().machine(name)
    group = created.resource_group if created is not None else item.record.cloud_resource_group

    def change(_: Any, rec: ItemRecord) -> None:
        rec.cloud_machine = name
        rec.cloud_resource_group = group  # RP-ELIGIBLE later compares against it

    repo.update(item.id, change)
    return {"machine": name, "resource_group": group}


@task_handler("detach-from-master-target")
def detach_from_master_target(ctx: TaskContext) -> dict[str, Any]:
    """Failback: take the on-premises disks off the master target VM (RP-MT-MOVE fails here if moved)."""
    item = repo.load(ctx.args["item"])
    fabric = repo.site_fabric(item.record, Site.ONPREM)
    mt_machine = str(ctx.args["mt_machine"])
    inv = fabric.discover()
    mt = inv.machine(mt_machine)
    uuids = {d["uuid"] for d in item.record.placed_disks}
    attached = [d.uuid for d in (mt.disks if mt else ()) if d.uuid in uuids]
    if attached:
        try:
            fabric.detach_disks(mt_machine, attached)
        except Exception as exc:
            if is_transient(exc):
                raise  # the job engine retries the step (store/jobs.py)
            code = getattr(exc, "code", "detach-failed")
            raise SiteRecoveryError(
                Problem(
                    code,
                    str(getattr(exc, "message", exc)),
                    str(getattr(exc, "remediation", ""))
                    or "Find the disks, attach them to the machine and boot it.",
                    rule=rules.MT_DISKS_MOVED.id if code == rules.MT_DISKS_MOVED.code else None,
                )
            ) from exc
    return {"detached": attached}


@task_handler("start-recovery-machine")
def start_recovery_machine(ctx: TaskContext) -> dict[str, Any]:
    item = repo.load(ctx.args["item"])
    site = Site(ctx.args["target_site"])
    fabric = repo.site_fabric(item.record, site)
    machine = _machine_of(item, site)
    since = time.time()
    repo.set_power(fabric, machine, PowerState.ON)
    verdict = await_verdict(fabric, machine, since)
    booted = time.time()
    cycle = item.record.failover_point
    flushed = cycle.get("source_flushed")
    # A planned failover must not lose a record the source guest had flushed (acknowledged).
    if ctx.args.get("planned") and isinstance(flushed, int) and verdict.get("observable"):
        records = int(verdict.get("records", 0) or 0)
        if records < flushed:
            verdict = {
                **verdict,
                "ok": False,
                "reason": f"data loss: {records} records recovered, {flushed} were flushed at shutdown",
            }
    shutdown_at = cycle.get("shutdown_at")
    downtime = booted - shutdown_at if isinstance(shutdown_at, float) else None

    def change(_: Any, rec: ItemRecord) -> None:
        rec.active_site = site
        rec.oracle[site.value] = verdict
        rec.metrics.append(
            StepMetric(
                step=str(ctx.args.get("step", f"failover to {site.value}")),
                seconds=round(booted - _as_float(cycle.get("started_at"), since), 2),
                downtime_seconds=round(downtime, 2) if downtime is not None else None,
                oracle=_verdict_text(verdict),
            )
        )

    repo.update(item.id, change)
    return {"booted_at": booted, "oracle": verdict, "downtime_seconds": downtime}


def _as_float(value: object, default: float) -> float:
    return float(value) if isinstance(value, (int, float)) else default


def _verdict_text(verdict: dict[str, Any]) -> str:
    if not verdict.get("observable", True):
        return "n/a"
    if verdict.get("ok"):
        return f"pass ({verdict.get('records', 0)} records)"
    return f"FAIL: {verdict.get('reason', '?')}"


@task_handler("mark-failed-over")
def mark_failed_over(ctx: TaskContext) -> dict[str, Any]:
    direction = Direction(ctx.args["direction"])
    item = repo.set_state(ctx.args["item"], ProtectionState.FAILED_OVER, direction)
    return {"state": item.state.value}


@task_handler("verify-recovery")
def verify_recovery(ctx: TaskContext) -> dict[str, Any]:
    """The job's last word: a recovered guest whose oracle failed fails the job, with the verdict.

    It runs after the item is marked failed over (the machine does run there, and its point can
    still change until commit), so the item's state is true while the job is not "succeeded".
    """
    item = repo.load(ctx.args["item"])
    site = Site(ctx.args["target_site"])
    raw = item.record.oracle.get(site.value)
    verdict: dict[str, Any] = raw if isinstance(raw, dict) else {}
    if verdict.get("observable", True) and not verdict.get("ok", True):
        raise recovery_verdict_failed(_machine_of(item, site), site.value, str(verdict.get("reason", "?")))
    return {"verdict": _verdict_text(verdict) if verdict else "n/a"}


# ---- reprotect (RPW-1..7) -------------------------------------------------------------------


@task_handler("reprotect-check")
def reprotect_check(ctx: TaskContext) -> dict[str, Any]:
    item = repo.load(ctx.args["item"])
    if Site(ctx.args["source_site"]) is Site.CLOUD:
        ensure_reprotect(build_reprotect_context(item, ReprotectArgs.model_validate(ctx.args)))
        with current().db.session() as s:
            problems = libvirt_reprotect_problems(s, item, ctx.args) + reprotect_capture_problems(s, item)
        if problems:
            raise SiteRecoveryError(problems)
    else:
        problems = forward_problems(item, ReprotectArgs.model_validate(ctx.args))
        with current().db.session() as s:
            problems += reprotect_capture_problems(s, item)
        if problems:
            raise SiteRecoveryError(problems)
    return {"ready": True}


@task_handler("power-off-target")
def power_off_target(ctx: TaskContext) -> dict[str, Any]:
    """RPW-5: the machine whose disks the master target will write is turned off and kept off."""
    item = repo.load(ctx.args["item"])
    target = Site(ctx.args["source_site"]).other
    fabric = repo.site_fabric(item.record, target)
    machine = _machine_of(item, target)
    if repo.set_power(fabric, machine, PowerState.OFF):
        return {"powered_off": machine}
    return {"powered_off": None}


@task_handler("merge-snapshots")
def merge_snapshots(ctx: TaskContext) -> dict[str, Any]:
    """RP-VM-SNAP: snapshots on the on-premises machine are merged, not a reason to refuse."""
    item = repo.load(ctx.args["item"])
    fabric = repo.site_fabric(item.record, Site.ONPREM)
    found = fabric.discover().machine(item.record.machine)
    merged = fabric.consolidate_snapshots(item.record.machine) if found and found.snapshots else 0
    ctx.progress(message=f"{merged} snapshot(s) merged")
    return {"merged": merged}


@task_handler("prepare-onprem-disks")
def prepare_onprem_disks(ctx: TaskContext) -> dict[str, Any]:
    """RPW-6: attach the existing machine's disks to the master target, or create the machine anew."""
    item = repo.load(ctx.args["item"])
    fabric = repo.site_fabric(item.record, Site.ONPREM)
    mt_machine = str(ctx.args["mt_machine"])
    inv = fabric.discover()
    existing = inv.machine(item.record.machine)
    created = False
    if existing is None:
        existing = recreate_domain(fabric, item.record, str(ctx.args["datastore"]))
        created = existing is not None
    if existing is None:
        mt = inv.machine(mt_machine)
        host = mt.host if mt else ""
        # Alternate-location recovery: the new machine joins the master target's network.
        network = mt.nics[0].network if mt and mt.nics else ""
        existing = fabric.create_machine(
            MachineSpec(
                name=item.record.machine,
                host=host,
                datastore=str(ctx.args["datastore"]),
                os_type=OsType(item.record.os_type),
                os_version=item.record.os_version,
                disks=tuple(DiskSpec(d.label, d.size) for d in item.record.disks),
                nics=tuple(
                    Nic(n.name, n.mac, IpMode(n.ip_mode), n.address, n.prefix, n.gateway, network)
                    for n in item.record.nics
                ),
            )
        )
        created = True
    by_label = {d.label: d for d in existing.disks}
    mt_now = fabric.discover().machine(mt_machine)
    on_mt = {d.uuid for d in (mt_now.disks if mt_now else ())}
    to_attach = [d for d in existing.disks if d.uuid not in on_mt]
    if to_attach:
        fabric.attach_disks(mt_machine, to_attach)
    placed = [{"uuid": d.uuid, "backing": d.backing} for d in existing.disks]

    def change(_: Any, rec: ItemRecord) -> None:
        for disk in rec.disks:
            found: Disk | None = by_label.get(disk.label)
            if found is not None:
                disk.onprem_path, disk.onprem_uuid = found.backing, found.uuid
        rec.placed_disks = placed

    repo.update(item.id, change)
    if created:
        repo.update(item.id, _mark_created)
    return {"created": created, "attached": [d.uuid for d in to_attach]}


def _mark_created(_: Any, rec: ItemRecord) -> None:
    rec.target_created = True


# ---- commit, disable ------------------------------------------------------------------------


@task_handler("commit")
def commit(ctx: TaskContext) -> dict[str, Any]:
    item = repo.load(ctx.args["item"])
    if item.state is ProtectionState.FAILOVER_COMMITTED and item.record.held is None:
        return {"state": item.state.value}  # replayed after it finished
    if item.state is not ProtectionState.FAILED_OVER:
        raise SiteRecoveryError(
            Problem(
                rules.NOT_FAILED_OVER.code,
                f"Item {item.name} is {item.state}; only a failed-over item can be committed.",
                "Fail the item over first.",
            )
        )
    _forget_held(item)
    repo.set_state(item.id, ProtectionState.FAILOVER_COMMITTED)
    return {"state": ProtectionState.FAILOVER_COMMITTED}


def _forget_held(item: repo.ItemSnapshot) -> None:
    """Commit (or disable): the recovery point is final; the snapshot before boot goes."""
    held = item.record.held
    if held is None:
        return
    if held.snapshot:
        drop_snapshot(repo.site_fabric(item.record, held.site), held.machine, held.snapshot)

    def change(_: Any, rec: ItemRecord) -> None:
        if rec.held is not None:
            rec.end_pairs(rec.held.replication)
        rec.held = None

    repo.update(item.id, change)


@task_handler("disable")
def disable(ctx: TaskContext) -> dict[str, Any]:
    _forget_held(repo.load(ctx.args["item"]))

    def change(item: Any, rec: ItemRecord) -> None:
        if rec.replication is not None:
            rec.end_pairs(rec.replication)
        rec.replication = None
        item.state = ProtectionState.DISABLED

    repo.update(ctx.args["item"], change)
    return {"state": ProtectionState.DISABLED}
