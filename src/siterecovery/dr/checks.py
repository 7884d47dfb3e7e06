"""Reprotect and failback prerequisite checks: every failing rule at once, before anything changes.

`check_reprotect` and `check_failback` run every rule that applies to the operation, in
REQUIREMENTS.md order, and return one `Problem` per failing rule (code, message naming the object,
remediation), so `--what-if` and the real operation refuse with the same list. They are pure
functions of a `Situation`: the configuration server's records plus inventories just discovered
through the `Fabric` interface. A rule whose input is missing because another rule already failed
(no on-premises inventory, an unknown master target) is skipped rather than reported twice in
other words. `dr.notes` lists what does not block but the reprotect job will do (RP-VM-SNAP).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

from siterecovery.dr import rules
from siterecovery.dr.check_inputs import ReprotectContext, Situation
from siterecovery.dr.facts import Facts, resolve
from siterecovery.errors import Problem, SiteRecoveryError, Status
from siterecovery.fabrics.base import (
    CloudOrigin,
    DatastoreType,
    Host,
    HypervisorKind,
    Inventory,
    LicenceEdition,
    OsType,
    ScsiType,
)
from siterecovery.store.states import Direction, ProtectionState

# Where recovery points go when the request names no retention volume (RP-RET).
DEFAULT_RETENTION_VOLUME: Mapping[OsType, str] = {OsType.WINDOWS: "R:", OsType.LINUX: "/mnt/retention"}

# RP-W2K8: 2008 R2 is supportable only with SP1 anyway, so matching the release is enough and
# tolerates the many ways guests spell the service pack.
_W2K8_R2 = re.compile(r"windows\s+server\s+2008\s+r2", re.IGNORECASE)


def _age(age: float | None) -> str:
    return "has never sent a heartbeat" if age is None else f"last sent a heartbeat {age:.0f} s ago"


@dataclass(frozen=True)
class _Check:
    """One check function and the rules whose problems it may return (for the rule lists)."""

    rules: tuple[rules.Rule, ...]
    run: Callable[[Facts], Iterator[Problem]]
    vsphere_only: bool = False  # no meaning on a libvirt site (docs/prerequisites.md); LV-* judge it


def _check(
    *covers: rules.Rule, vsphere_only: bool = False
) -> Callable[[Callable[[Facts], Iterator[Problem]]], _Check]:
    def wrap(fn: Callable[[Facts], Iterator[Problem]]) -> _Check:
        return _Check(covers, fn, vsphere_only)

    return wrap


def _libvirt_site(inventory: Inventory | None) -> bool:
    """A site whose hosts are all libvirt (KVM) hosts: the libvirt fabric's discovery."""
    return (
        inventory is not None
        and bool(inventory.hosts)
        and all(h.kind is HypervisorKind.KVM for h in inventory.hosts)
    )


@_check(rules.CS_UNKNOWN_MACHINE)
def _cs_unknown_machine(f: Facts) -> Iterator[Problem]:
    if not f.ctx.item.machine_recorded:
        machine = f.ctx.item.machine
        yield rules.CS_UNKNOWN_MACHINE.problem(
            f"The configuration server's database has no record of machine {machine}.", machine=machine
        )


@_check(rules.CS_UNREACHABLE)
def _cs_unreachable(f: Facts) -> Iterator[Problem]:
    mt, timeout = f.ctx.master_target, f.ctx.heartbeat_timeout
    if mt and not mt.connected(timeout):
        yield rules.CS_UNREACHABLE.problem(
            f"Master target {mt.name} does not reach the configuration server: it "
            f"{_age(mt.heartbeat_age)} (timeout {timeout:.0f} s).",
            master_target=mt.name,
        )


@_check(rules.MT_OS_MISMATCH)
def _mt_os_mismatch(f: Facts) -> Iterator[Problem]:
    mt, item = f.ctx.master_target, f.ctx.item
    if mt and mt.os_type != item.os_type:
        yield rules.MT_OS_MISMATCH.problem(
            f"Master target {mt.name} runs {mt.os_type} but machine {item.machine} runs {item.os_type}.",
            os_type=str(item.os_type),
            machine=item.machine,
        )


@_check(rules.MT_DISK_LIMIT)
def _mt_disk_limit(f: Facts) -> Iterator[Problem]:
    if f.reprotect is None or f.mt_vm is None:
        return
    present, pending, adds = len(f.mt_vm.disks), f.reprotect.pending_mt_disks, f.ctx.item.disk_count
    if present + pending + adds > rules.MAX_MT_DISKS:
        yield rules.MT_DISK_LIMIT.problem(
            f"Master target {f.mt_name} would have {present + pending + adds} disks attached "
            f"({present} now, {pending} pending, {adds} for machine {f.ctx.item.machine}); "
            f"the limit is {rules.MAX_MT_DISKS}.",
            needed=str(adds),
        )


@_check(rules.AGENT_NOT_REGISTERED)
def _agent_not_registered(f: Facts) -> Iterator[Problem]:
    if f.ctx.agent is None:
        machine = f.ctx.item.cloud_machine
        yield rules.AGENT_NOT_REGISTERED.problem(
            f"The mobility agent of {machine} has not registered with the configuration server "
            "since the machine booted in the cloud.",
            machine=machine,
        )


@_check(rules.DISK_UUID_CLASH)
def _disk_uuid_clash(f: Facts) -> Iterator[Problem]:
    if f.existing_vm is None or f.mt_vm is None:
        return
    mt_uuids = {d.uuid.lower() for d in f.mt_vm.disks}
    clashes = [d for d in f.existing_vm.disks if d.uuid.lower() in mt_uuids]
    if clashes:
        vm = f.existing_vm
        yield rules.DISK_UUID_CLASH.problem(
            f"Disk {', '.join(d.label for d in clashes)} of machine {vm.name} has the same UUID "
            f"({', '.join(d.uuid for d in clashes)}) as a disk of master target {f.mt_name}.",
            machine=vm.name,
        )


@_check(rules.VCENTER_NOT_DISCOVERED, rules.MT_NOT_DISCOVERED)
def _vcenter_discovered(f: Facts) -> Iterator[Problem]:
    vcenter = f.ctx.vcenter
    if f.ctx.onprem is None:
        yield rules.VCENTER_NOT_DISCOVERED.problem(
            f"vCenter {vcenter} has not been discovered by the configuration server.", vcenter=vcenter
        )
    mt = f.ctx.master_target
    if mt is None:
        why = "is not registered with the configuration server"
    elif f.ctx.onprem is None:
        return  # its VM cannot be looked for; the vCenter problem above says why
    elif f.mt_vm is None:
        why = f"runs on VM {mt.machine}, which is not in the inventory of vCenter {vcenter}"
    elif f.mt_host is None:
        why = f"runs on host {f.mt_vm.host or '(none)'}, which is not in the inventory of vCenter {vcenter}"
    else:
        return
    yield rules.MT_NOT_DISCOVERED.problem(
        f"Master target {f.mt_name} {why}.", master_target=f.mt_name, vcenter=vcenter
    )


@_check(rules.DATASTORES_NOT_VISIBLE)
def _datastores_visible(f: Facts) -> Iterator[Problem]:
    if f.mt_host is None or f.host_datastores or f.ctx.onprem is None:
        return
    # Discovery's own warnings (the provider's words on why it saw less) travel in `detail`.
    yield rules.DATASTORES_NOT_VISIBLE.problem(
        f"No datastore of host {f.mt_host.name} (master target {f.mt_name}) is visible to the "
        "configuration server, as happens when the vCenter account is read-only.",
        vcenter=f.ctx.vcenter,
        discovery=" ".join(f.ctx.onprem.warnings),
    )


@_check(rules.VCENTER_INSUFFICIENT_PRIVILEGES, vsphere_only=True)
def _vcenter_privileges(f: Facts) -> Iterator[Problem]:
    missing = f.ctx.onprem.missing_privileges() if f.ctx.onprem else ()
    if missing:
        yield rules.VCENTER_INSUFFICIENT_PRIVILEGES.problem(
            f"The account of vCenter {f.ctx.vcenter} lacks privileges {', '.join(missing)}.",
            vcenter=f.ctx.vcenter,
            missing=", ".join(missing),
        )


@_check(rules.SOURCE_UNREACHABLE)
def _source_reachable(f: Facts) -> Iterator[Problem]:
    agent, timeout = f.ctx.agent, f.ctx.heartbeat_timeout
    if agent and not agent.connected(timeout):
        machine = f.ctx.item.cloud_machine
        yield rules.SOURCE_UNREACHABLE.problem(
            f"Machine {machine} does not reach the configuration server: its agent "
            f"{_age(agent.heartbeat_age)} (timeout {timeout:.0f} s).",
            machine=machine,
        )


@_check(rules.PS_DISCONNECTED)
def _ps_connected(f: Facts) -> Iterator[Problem]:
    ps, timeout = f.ctx.process_server, f.ctx.heartbeat_timeout
    if ps is None:
        why = "is not registered with the configuration server"
    elif not ps.connected(timeout):
        why = f"is disconnected: it {_age(ps.heartbeat_age)} (timeout {timeout:.0f} s)"
    else:
        return
    yield rules.PS_DISCONNECTED.problem(f"Process server {f.ps_name} {why}.", process_server=f.ps_name)


@_check(rules.MT_HAS_SNAPSHOTS)
def _mt_snapshots(f: Facts) -> Iterator[Problem]:
    if f.mt_vm and f.mt_vm.snapshots:
        names = ", ".join(s.name for s in f.mt_vm.snapshots)
        yield rules.MT_HAS_SNAPSHOTS.problem(
            f"Master target {f.mt_name} has snapshots ({names}).", master_target=f.mt_name
        )


@_check(rules.GROUP_MIXED_OS)
def _group_os(f: Facts) -> Iterator[Problem]:
    item = f.ctx.item
    if f.reprotect is None or item.group is None:
        return
    others = [m for m in f.reprotect.group if m.os_type != item.os_type]
    if others:
        listed = ", ".join(f"{m.item} ({m.os_type})" for m in others)
        yield rules.GROUP_MIXED_OS.problem(
            f"Replication group {item.group} mixes OS types: {item.machine} runs {item.os_type}, "
            f"but {listed}.",
            group=item.group,
        )


@_check(rules.GROUP_MIXED_MT)
def _group_mt(f: Facts) -> Iterator[Problem]:
    item = f.ctx.item
    if f.reprotect is None or item.group is None:
        return
    others = [m for m in f.reprotect.group if m.master_target not in (None, f.mt_name)]
    if others:
        listed = ", ".join(f"{m.item} ({m.master_target})" for m in others)
        yield rules.GROUP_MIXED_MT.problem(
            f"Replication group {item.group} is given several master targets: {item.machine} "
            f"{f.mt_name}, but {listed}.",
            group=item.group,
            master_target=f.mt_name,
        )


@_check(rules.GROUP_NEEDS_RECOVERY_PLAN)
def _group_plan(f: Facts) -> Iterator[Problem]:
    group = f.ctx.item.group
    if f.reprotect is None or group is None:
        return
    if not f.reprotect.request.via_plan:
        why = "is reprotected on its own, not through a recovery plan"
    else:
        unset = [m.item for m in f.reprotect.group if m.master_target is None]
        if not unset:
            return
        why = f"is reprotected through a recovery plan that gives no values for {', '.join(unset)}"
    yield rules.GROUP_NEEDS_RECOVERY_PLAN.problem(
        f"Machine {f.ctx.item.machine} of replication group {group} {why}.", group=group
    )


@_check(rules.MT_ON_LVM)
def _mt_lvm(f: Facts) -> Iterator[Problem]:
    if f.mt_vm and f.mt_vm.os_type is OsType.LINUX and f.mt_vm.on_lvm:
        yield rules.MT_ON_LVM.problem(f"Linux master target {f.mt_name} is installed on LVM.")


@_check(rules.DATASTORE_NOT_WRITABLE)
def _datastores_writable(f: Facts) -> Iterator[Problem]:
    if f.existing_vm is None or f.mt_host is None or f.ctx.onprem is None or not f.host_datastores:
        return
    host = f.mt_host.name
    names = sorted({d.datastore for d in f.existing_vm.disks if d.datastore})
    bad = [n for n in names if not ((ds := f.ctx.onprem.datastore(n)) and ds.writable_on(host))]
    if bad:
        listed = ", ".join(bad)
        yield rules.DATASTORE_NOT_WRITABLE.problem(
            f"Datastore {listed} of machine {f.existing_vm.name} is not mounted read/write on host "
            f"{host} of master target {f.mt_name}.",
            datastores=listed,
            host=host,
        )


@_check(rules.MT_DISKS_MOVED)
def _mt_disks_moved(f: Facts) -> Iterator[Problem]:
    if f.mt_vm is None or f.ctx.onprem is None:
        return
    now = {d.uuid.lower(): d.backing for d in f.mt_vm.disks}
    moved = [p for p in f.ctx.item.placed_disks if now.get(p.uuid.lower()) != p.backing]
    if not moved:
        return
    # Storage vMotion moves attached disks with the master target; a detached one may be on any
    # machine. Say where each is now, so the operator's manual recovery starts from there.
    elsewhere = {d.uuid.lower(): d.backing for m in f.ctx.onprem.machines for d in m.disks}
    where = []
    for p in moved:
        at = now.get(p.uuid.lower()) or elsewhere.get(p.uuid.lower(), "not found")
        where.append(f"{p.uuid} was at {p.backing}, now {at}")
    machine = f.existing_vm.name if f.existing_vm else f.ctx.item.machine
    yield rules.MT_DISKS_MOVED.problem(
        f"Disks of machine {machine} are no longer where reprotect attached them to master target "
        f"{f.mt_name}: {'; '.join(where)}.",
        disks=", ".join(p.uuid for p in moved),
        machine=machine,
        master_target=f.mt_name,
    )


@_check(rules.RETENTION_VOLUME_INELIGIBLE)
def _retention_volume(f: Facts) -> Iterator[Problem]:
    mt = f.ctx.master_target
    if f.reprotect is None or mt is None:
        return
    name = f.reprotect.request.retention_volume or DEFAULT_RETENTION_VOLUME[mt.os_type]
    volume = next((v for v in mt.retention_volumes if v.name == name), None)
    if volume is None:
        why = "is not a volume of it (a new volume appears after the master target's next refresh)"
    elif not volume.eligible:
        why = f"is not eligible: {volume.reason or 'it fails an eligibility criterion'}"
    else:
        return
    eligible = ", ".join(v.name for v in mt.retention_volumes if v.eligible) or "none now"
    yield rules.RETENTION_VOLUME_INELIGIBLE.problem(
        f"Retention volume {name} of master target {mt.name} {why}.",
        master_target=mt.name,
        eligible=eligible,
    )


@_check(rules.MT_TOOLS_MISSING, vsphere_only=True)
def _mt_tools(f: Facts) -> Iterator[Problem]:
    if f.mt_vm and not f.mt_vm.tools_running:
        yield rules.MT_TOOLS_MISSING.problem(
            f"VMware Tools are not running on master target {f.mt_name}.", master_target=f.mt_name
        )


@_check(rules.MT_ENABLEUUID_MISSING, vsphere_only=True)
def _mt_enableuuid(f: Facts) -> Iterator[Problem]:
    if f.mt_vm is None:
        return
    # vSphere keeps advanced settings case-insensitively, and "TRUE" is as good as "true".
    value = next((v for k, v in f.mt_vm.extra_config.items() if k.lower() == "disk.enableuuid"), "")
    if value.strip().lower() != "true":
        shown = f"is {value!r}" if value else "is not set"
        yield rules.MT_ENABLEUUID_MISSING.problem(
            f"disk.EnableUUID {shown} on master target {f.mt_name}.", master_target=f.mt_name
        )


@_check(rules.MT_HOST_NO_VMFS, vsphere_only=True)
def _mt_vmfs(f: Facts) -> Iterator[Problem]:
    if f.mt_host and f.host_datastores and all(d.type is not DatastoreType.VMFS for d in f.host_datastores):
        host = f.mt_host.name
        present = ", ".join(f"{d.name} ({d.type.value})" for d in f.host_datastores)
        yield rules.MT_HOST_NO_VMFS.problem(
            f"Host {host} of master target {f.mt_name} has no VMFS datastore; it has {present}.", host=host
        )


@_check(rules.MT_PARAVIRTUAL_CONTROLLER, vsphere_only=True)
def _mt_scsi(f: Facts) -> Iterator[Problem]:
    if f.mt_vm is None:
        return
    bad = [c for c in f.mt_vm.controllers if c.type is not ScsiType.LSILOGIC]
    if bad:
        keys = ", ".join(str(c.key) for c in bad)
        yield rules.MT_PARAVIRTUAL_CONTROLLER.problem(
            f"Master target {f.mt_name} has a ParaVirtual SCSI controller (key {keys}).",
            master_target=f.mt_name,
        )


def _target_host(f: Facts) -> Host | None:
    return f.ctx.onprem.host(f.target_host) if f.ctx.onprem and f.target_host else None


@_check(rules.HOST_FREE_EDITION)
def _host_free(f: Facts) -> Iterator[Problem]:
    host = _target_host(f)
    if host and host.licence is LicenceEdition.FREE:
        yield rules.HOST_FREE_EDITION.problem(
            f"Host {host.name}, which machine {f.ctx.item.machine} fails back to, runs a free-edition "
            "hypervisor licence.",
            host=host.name,
        )


@_check(rules.OS_NOT_FAILBACK_CAPABLE)
def _w2k8(f: Facts) -> Iterator[Problem]:
    item = f.ctx.item
    if item.physical and _W2K8_R2.search(item.os_version):
        yield rules.OS_NOT_FAILBACK_CAPABLE.problem(
            f"Machine {item.machine} runs {item.os_version} and is protected as a physical server.",
            machine=item.machine,
        )


@_check(rules.NOT_FAILBACK_ELIGIBLE)
def _eligible(f: Facts) -> Iterator[Problem]:
    item, vm = f.ctx.item, f.cloud_vm
    reasons: list[str] = []
    if item.state is ProtectionState.DISABLED:
        reasons.append("its protection was disabled")
    if vm is None:
        reasons.append(f"its cloud machine {item.cloud_machine} was deleted")
    else:
        if vm.origin is CloudOrigin.MIGRATION:
            reasons.append(f"{vm.name} was migrated to the cloud, not failed over")
        # A libvirt recovery site keeps no origin: its domain is the one the failover job defined.
        elif vm.origin is not CloudOrigin.FAILOVER and not (vm.origin is None and _libvirt_site(f.ctx.cloud)):
            reasons.append(f"{vm.name} was created in the cloud, not by a failover")
        if vm.resource_group != item.cloud_resource_group:
            reasons.append(
                f"{vm.name} was moved from resource group {item.cloud_resource_group} to {vm.resource_group}"
            )
    if reasons:
        yield rules.NOT_FAILBACK_ELIGIBLE.problem(
            f"Machine {item.machine} cannot be failed back: {'; '.join(reasons)}.", machine=item.machine
        )


@_check(rules.TARGET_NOT_ESXI, vsphere_only=True)
def _esxi_only(f: Facts) -> Iterator[Problem]:
    if f.ctx.onprem is None or not f.target_host:
        return
    host = _target_host(f)
    if host is None or host.kind is not HypervisorKind.ESXI:
        kind = host.kind if host else "not in the vCenter inventory"
        yield rules.TARGET_NOT_ESXI.problem(
            f"Host {f.target_host}, which machine {f.ctx.item.machine} fails back to, is not an ESXi "
            f"host ({kind}).",
            machine=f.ctx.item.machine,
        )


@_check(rules.DATASTORE_REQUIRED)
def _datastore_arg(f: Facts) -> Iterator[Problem]:
    if f.reprotect is None:
        return
    host = f.mt_host.name if f.mt_host else ""
    usable = [d.name for d in f.host_datastores if d.writable_on(host)]
    choices = ", ".join(usable) or "none now"
    given = f.reprotect.request.datastore
    if not given:
        yield rules.DATASTORE_REQUIRED.problem(
            f"No datastore was given for machine {f.ctx.item.machine} (it is required even when the "
            "disks already exist).",
            choices=choices,
        )
    # Only a machine created anew lands in the datastore; with existing disks it is ignored.
    elif f.existing_vm is None and f.mt_host and f.host_datastores and given not in usable:
        yield rules.DATASTORE_REQUIRED.problem(
            f"Datastore {given}, where the new machine {f.ctx.item.machine} would be created, is not "
            f"mounted read/write on host {host} of master target {f.mt_name}.",
            choices=choices,
        )


@_check(rules.NOT_FAILED_OVER)
def _reprotect_stage(f: Facts) -> Iterator[Problem]:
    item = f.ctx.item
    # A disabled item is reported by RP-ELIGIBLE, with the other eligibility reasons.
    if item.state not in (ProtectionState.FAILOVER_COMMITTED, ProtectionState.DISABLED):
        yield rules.NOT_FAILED_OVER.problem(
            f"Machine {item.machine} is not running in the cloud after a committed failover "
            f"(state {item.state}, direction {item.direction}).",
            machine=item.machine,
        )


@_check(rules.NOT_REPROTECTED)
def _failback_stage(f: Facts) -> Iterator[Problem]:
    item = f.ctx.item
    ready = item.state is ProtectionState.PROTECTED and item.direction is Direction.FAILBACK
    if not ready and item.state is not ProtectionState.DISABLED:
        yield rules.NOT_REPROTECTED.problem(
            f"Machine {item.machine} is not protected in the failback direction "
            f"(state {item.state}, direction {item.direction}).",
            machine=item.machine,
        )


# The state check first, then REQUIREMENTS.md order. A state problem comes alone: the other rules
# would judge an item that is not where the operation starts (one replicating forward has no
# cloud VM yet, so RP-ELIGIBLE would call it deleted).
_REPROTECT: tuple[_Check, ...] = (
    _reprotect_stage,
    _cs_unknown_machine,
    _cs_unreachable,
    _mt_os_mismatch,
    _mt_disk_limit,
    _agent_not_registered,
    _disk_uuid_clash,
    _vcenter_discovered,
    _datastores_visible,
    _vcenter_privileges,
    _source_reachable,
    _ps_connected,
    _mt_snapshots,
    _group_os,
    _group_mt,
    _group_plan,
    _mt_lvm,
    _datastores_writable,
    _retention_volume,
    _mt_tools,
    _mt_enableuuid,
    _mt_vmfs,
    _mt_scsi,
    _host_free,
    _w2k8,
    _eligible,
    _esxi_only,
    _datastore_arg,
)
# Failback writes nothing new to vCenter but detaches disks and powers machines: the rules about
# choosing and preparing a master target were settled at reprotect; those about reaching the
# components, the disks it holds, and the host and machine failed back to apply again.
_FAILBACK: tuple[_Check, ...] = (
    _failback_stage,
    _cs_unknown_machine,
    _cs_unreachable,
    _vcenter_discovered,
    _vcenter_privileges,
    _source_reachable,
    _ps_connected,
    _mt_snapshots,
    _mt_disks_moved,
    _host_free,
    _w2k8,
    _eligible,
    _esxi_only,
)


def _run(checks: tuple[_Check, ...], ctx: Situation) -> list[Problem]:
    facts = resolve(ctx)
    stage, rest = checks[0], checks[1:]
    wrong_stage = list(stage.run(facts))
    if wrong_stage:
        return wrong_stage
    libvirt = _libvirt_site(ctx.onprem)
    return [p for c in rest if not (libvirt and c.vsphere_only) for p in c.run(facts)]


def check_reprotect(ctx: ReprotectContext) -> list[Problem]:
    """Every rule reprotect of `ctx.item` breaks, in REQUIREMENTS order; [] when it may proceed."""
    return _run(_REPROTECT, ctx)


def check_failback(ctx: Situation) -> list[Problem]:
    """Every rule failback of `ctx.item` breaks, in REQUIREMENTS order; [] when it may proceed."""
    return _run(_FAILBACK, ctx)


def ensure_reprotect(ctx: ReprotectContext) -> None:
    """Refuse reprotect with every failing rule (409), before the job changes anything."""
    problems = check_reprotect(ctx)
    if problems:
        raise SiteRecoveryError(problems, Status.CONFLICT)


def ensure_failback(ctx: Situation) -> None:
    """Refuse failback with every failing rule (409), before the job changes anything."""
    problems = check_failback(ctx)
    if problems:
        raise SiteRecoveryError(problems, Status.CONFLICT)


# The rules each operation enforces, in the order their problems are listed (docs, tests).
REPROTECT_RULES: tuple[rules.Rule, ...] = tuple(r for c in _REPROTECT for r in c.rules)
FAILBACK_RULES: tuple[rules.Rule, ...] = tuple(r for c in _FAILBACK for r in c.rules)
