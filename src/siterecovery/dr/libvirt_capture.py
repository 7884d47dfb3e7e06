"""Capture on a libvirt domain, put in place by the jobs (option a of docs/libvirt.md).

Protecting a libvirt domain makes each of its disks the NBD export, over a Unix socket, of the
machine's agent on that host: enable does it before the initial sync, and a reprotect does it for
the domain that becomes the source (the recovery domain, or the original one again after a
failback). The agent reports what it serves (`AgentStats.exports`: label, image, socket), so a disk
is matched to the export whose image is the disk's volume; a disk no export serves over a socket
refuses the operation (LV-CAPTURE) before anything changes. A stopped domain takes the new source
at once. A running one has its persistent definition changed and keeps its current disk until its
next power cycle: the task waits for that (an item alert `capture-pending` says so) and the
initial sync starts only once the domain runs on the exports (or is stopped), since a write QEMU
sends to the volume directly would never reach the replica. Disable points the disks back at their
volumes (the domain's metadata records them, `fabrics/libvirt_capture.py`).
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from typing import Any, Protocol, cast

from sqlalchemy.orm import Session

from siterecovery.dataplane.assignments import AgentStats, DiskExport
from siterecovery.dr import items as repo
from siterecovery.dr import rules
from siterecovery.dr.desired import agent_name
from siterecovery.errors import Problem, SiteRecoveryError, Status
from siterecovery.fabrics import libvirt_xml as lx
from siterecovery.fabrics.base import FabricError, Machine
from siterecovery.retry import is_transient
from siterecovery.store.context import current
from siterecovery.store.events import clear_alert, raise_alert, record_event
from siterecovery.store.jobs import TaskContext, TaskSpec, task_handler
from siterecovery.store.models import Fabric as FabricRow
from siterecovery.store.record import ItemRecord, Site
from siterecovery.store.states import ComponentKind, Direction, FabricKind, Severity

CAPTURE_RULES: tuple[rules.Rule, ...] = (rules.LIBVIRT_CAPTURE,)
PENDING = "capture-pending"  # the item's alert while a running domain waits for its power cycle
POLL_SECONDS = 2.0
_ITEM = "replicatedItem"


def capture_timeout() -> float:
    """Seconds a job waits for a running domain's power cycle (read when it waits)."""
    return float(os.environ.get("SITERECOVERY_CAPTURE_TIMEOUT", "86400"))


class _Capturable(Protocol):
    """What capture needs of a libvirt fabric (`LibvirtFabric`)."""

    def xml(self, machine: str, inactive: bool = True) -> str: ...

    def set_disk_sources(self, machine: str, sources: dict[str, str]) -> bool: ...


def is_libvirt(fabric_id: str) -> bool:
    with current().db.session() as s:
        row = s.get(FabricRow, fabric_id)
        return row is not None and row.kind == FabricKind.LIBVIRT


def _machine_at(rec: ItemRecord, site: Site) -> str:
    return rec.machine if site is Site.ONPREM else rec.cloud_machine or rec.machine


def _fabric_at(rec: ItemRecord, site: Site) -> str:
    return rec.onprem_fabric if site is Site.ONPREM else rec.cloud_fabric


def capture_sources(
    machine: str, disks: Sequence[tuple[str, str]], exports: Sequence[DiskExport]
) -> tuple[dict[str, str], list[Problem]]:
    """Disk target -> `nbd+unix://EXPORT@SOCKET` of the export serving its volume; and a problem
    (LV-CAPTURE) for each disk (label, volume) no export serves over a Unix socket."""
    by_image = {e.image: e for e in exports}
    served = ", ".join(f"{e.disk}={e.image}" for e in exports) or "nothing"
    sources: dict[str, str] = {}
    problems: list[Problem] = []
    for label, volume in disks:
        export = by_image.get(volume)
        if export is None:
            message = (
                f"The agent of {machine} does not serve disk {label}'s volume {volume} (it serves {served})."
            )
        elif not export.socket:
            message = (
                f"The agent of {machine} serves {volume} without a Unix socket (no --nbd-unix-dir), "
                "which a libvirt disk needs."
            )
        else:
            sources[label] = f"nbd+unix://{export.disk}@{export.socket}"
            continue
        problems.append(rules.LIBVIRT_CAPTURE.problem(message, machine=machine, disk=label, volume=volume))
    return sources, problems


def _exports(stats: dict[str, Any]) -> list[DiskExport]:
    return AgentStats.model_validate(stats).exports


def enable_capture_problems(s: Session, source: FabricRow, machine: Machine) -> list[Problem]:
    """LV-CAPTURE at the enable request, when the agent has reported what it serves (the job's
    task judges again, after the agent's first report)."""
    if source.kind != FabricKind.LIBVIRT:
        return []
    agent = repo.component(s, agent_name(Site.ONPREM.value, machine.name), ComponentKind.AGENT)
    if agent is None or not agent.stats:
        return []  # not registered (agent-not-registered says so) or not reported yet
    disks = [(d.label, d.backing) for d in machine.disks]
    return capture_sources(machine.name, disks, _exports(dict(agent.stats)))[1]


def reprotect_capture_problems(s: Session, item: repo.ItemSnapshot) -> list[Problem]:
    """LV-CAPTURE for a reprotect: the domain that becomes the source (the recovery domain after a
    failover, the original after a failback), when its agent has reported; else the task judges."""
    rec = item.record
    site = Site.CLOUD if item.direction is Direction.FORWARD else Site.ONPREM
    row = s.get(FabricRow, _fabric_at(rec, site))
    if row is None or row.kind != FabricKind.LIBVIRT:
        return []
    machine = _machine_at(rec, site)
    agent = repo.component(s, agent_name(site.value, machine), ComponentKind.AGENT)
    if agent is None or not agent.stats:
        return []
    disks = [(d.label, d.path(site)) for d in rec.disks]
    return capture_sources(machine, disks, _exports(dict(agent.stats)))[1]


def capture_tasks(rec: ItemRecord, item_id: str, site: Site) -> list[TaskSpec]:
    """The task putting capture in place on the machine at `site` when it is a libvirt domain."""
    if not is_libvirt(_fabric_at(rec, site)):
        return []
    title = f"Capture: {_machine_at(rec, site)}'s disks become its agent's exports"
    return [TaskSpec(title, "capture-in-place", {"item": item_id, "site": site.value})]


def release_tasks(rec: ItemRecord, item_id: str) -> list[TaskSpec]:
    """Disable: the libvirt domains of the item on either site get their volumes back."""
    return [
        TaskSpec(
            f"Put {_machine_at(rec, site)}'s disks back on their volumes",
            "capture-release",
            {"item": item_id, "site": site.value},
        )
        for site in (Site.ONPREM, Site.CLOUD)
        if is_libvirt(_fabric_at(rec, site)) and (site is Site.ONPREM or rec.cloud_machine)
    ]


def _reported_exports(site: Site, machine: str) -> list[DiskExport]:
    """The agent's exports from its first report (waited for up to the heartbeat timeout)."""
    deadline = time.monotonic() + current().config.heartbeat_timeout
    while True:
        with current().db.session() as s:
            agent = repo.component(s, agent_name(site.value, machine), ComponentKind.AGENT)
            stats = dict(agent.stats) if agent is not None and agent.stats else None
        if stats is not None:
            return _exports(stats)
        if time.monotonic() > deadline:
            raise SiteRecoveryError(
                rules.AGENT_NOT_REGISTERED.refusal(
                    f"The agent of {machine} ({site.value}) has not registered or reported yet.",
                    f"Start the agent of {machine} on its host and wait for it to register, then retry.",
                )
            )
        time.sleep(POLL_SECONDS)


def _on_sources(fabric: _Capturable, machine: str, sources: dict[str, str]) -> bool:
    """The domain runs on these sources, or is stopped (it starts on its persistent definition)."""
    root = lx.parse(fabric.xml(machine, inactive=False))
    if root.get("id") is None:  # only a running domain's live XML has an id
        return True
    live = {s.target: s.identity for s in lx.disk_sources(root)}
    return all(live.get(target) == source for target, source in sources.items())


@task_handler("capture-in-place")
def put_capture_in_place(ctx: TaskContext) -> dict[str, Any]:
    item = repo.load(ctx.args["item"])
    site = Site(ctx.args["site"])
    machine = _machine_at(item.record, site)
    disks = [(d.label, d.path(site)) for d in item.record.disks]
    sources, problems = capture_sources(machine, disks, _reported_exports(site, machine))
    if problems:
        raise SiteRecoveryError(problems, Status.UNPROCESSABLE)
    fabric = cast(_Capturable, repo.site_fabric(item.record, site))
    at_once = fabric.set_disk_sources(machine, sources)
    if not at_once and not _on_sources(fabric, machine, sources):
        _wait_for_power_cycle(ctx, item, fabric, machine, sources)
    return {"machine": machine, "sources": sources, "at_once": at_once}


def _wait_for_power_cycle(
    ctx: TaskContext, item: repo.ItemSnapshot, fabric: _Capturable, machine: str, sources: dict[str, str]
) -> None:
    notice = (
        f"Domain {machine} runs on its volumes; its disks become its agent's exports at its next power "
        "cycle. Shut it down and start it again: protection starts then."
    )
    with current().db.session() as s:
        raise_alert(s, Severity.WARNING, PENDING, notice, _ITEM, item.id)
    ctx.progress(message=notice)
    deadline = time.monotonic() + capture_timeout()
    while not _on_sources(fabric, machine, sources):
        if time.monotonic() > deadline:
            raise SiteRecoveryError(
                Problem(
                    "capture-pending-timeout",
                    f"Domain {machine} was not power-cycled within {capture_timeout():.0f} s, so its "
                    "disks never became its agent's exports.",
                    f"Shut {machine} down and start it again, then enable (or reprotect) again.",
                )
            )
        time.sleep(POLL_SECONDS)
    with current().db.session() as s:
        clear_alert(s, PENDING, _ITEM, item.id)
        record_event(
            s,
            Severity.INFO,
            "capture-in-place",
            f"Domain {machine} runs on its agent's exports.",
            _ITEM,
            item.id,
        )
    ctx.progress(message=f"{machine} runs on its agent's exports")


@task_handler("capture-release")
def release_capture(ctx: TaskContext) -> dict[str, Any]:
    """Each disk on an agent's export goes back to the volume recorded under it. A site that does
    not answer, or a domain that is gone, is left as it is (said in the result and an event)."""
    item = repo.load(ctx.args["item"])
    site = Site(ctx.args["site"])
    machine = _machine_at(item.record, site)
    try:
        fabric = cast(_Capturable, repo.site_fabric(item.record, site))
        root = lx.parse(fabric.xml(machine))
        on_export = {s.target for s in lx.disk_sources(root) if s.socket}
        back = {t: v for t, v in lx.captured(root).items() if t in on_export and v}
        at_once = fabric.set_disk_sources(machine, back) if back else True
    except FabricError as exc:
        if is_transient(exc):
            raise  # the job engine retries the step
        with current().db.session() as s:
            record_event(
                s,
                Severity.WARNING,
                "capture-left",
                f"{machine}: capture left as it is: {exc.message}",
                _ITEM,
                item.id,
            )
        return {"machine": machine, "released": {}, "skipped": exc.code}
    with current().db.session() as s:
        clear_alert(s, PENDING, _ITEM, item.id)
        if not at_once:
            record_event(
                s,
                Severity.WARNING,
                "capture-release-pending",
                f"Domain {machine} runs on its agent's exports until its next power cycle; keep the "
                "agent running until then.",
                _ITEM,
                item.id,
            )
    return {"machine": machine, "released": back, "at_once": at_once}
