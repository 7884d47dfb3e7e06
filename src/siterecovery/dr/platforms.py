"""What the DR jobs do differently when a site is a libvirt host rather than a lab or vSphere site.

Three seams, each a no-op for the other fabric kinds: where a replica disk is placed (a volume in
the chosen storage pool of the target host), how the recovery machine is made on failover (the
protected domain's XML recorded at enable, defined anew pointing at the replica volumes, so its
interfaces, MACs and firmware come back), and the libvirt prerequisites (LV-*) a reprotect onto a
libvirt site must pass, added to the same what-if list as the lab/vSphere rules so a refused
reprotect names every failing rule at once.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session

from siterecovery.dr import items as repo
from siterecovery.dr.fabric_access import open_fabric
from siterecovery.dr.libvirt_checks import LibvirtTarget, RecordedDomain, check_libvirt_site
from siterecovery.errors import Problem, SiteRecoveryError, Status
from siterecovery.fabrics import libvirt_xml as lx
from siterecovery.fabrics.base import Disk, Fabric, FabricError, Machine, OsType, PowerState
from siterecovery.store.context import current
from siterecovery.store.models import Fabric as FabricRow
from siterecovery.store.models import by_id_or_name
from siterecovery.store.record import ItemRecord, Site
from siterecovery.store.states import ComponentKind, FabricKind


def _refuse(code: str, message: str, remediation: str) -> SiteRecoveryError:
    return SiteRecoveryError(Problem(code, message, remediation), Status.UNPROCESSABLE)


def libvirt_replica_dir(row: FabricRow, pool: str) -> Path:
    """The directory of storage pool `pool` on the libvirt fabric `row`: the master target writes
    each replica disk there as a raw file, which libvirt lists as a volume after a pool refresh."""
    if not pool:
        raise _refuse(
            "target-datastore-required",
            f"Fabric {row.name} is a libvirt host; replica volumes need a storage pool there.",
            "Name a directory pool of the target host with --target-datastore (`virsh pool-list`).",
        )
    fabric = open_fabric(current(), row)
    try:
        xml = fabric.pool(pool).XMLDesc(0)  # type: ignore[attr-defined]
    except FabricError as exc:
        raise _refuse(exc.code, exc.message, exc.remediation) from exc
    finally:
        close = getattr(fabric, "close", None)
        if callable(close):
            close()
    path = lx.parse(xml).findtext("./target/path", "")
    if not path:
        raise _refuse(
            "target-datastore-unsupported",
            f"Storage pool {pool} on {row.name} has no directory the master target could write into.",
            "Choose a directory (dir or netfs) pool of the target host.",
        )
    return Path(path)


def recorded_xml(row: FabricRow, machine: str) -> str:
    """The protected domain's persistent XML, kept in the item's record when it is a libvirt domain
    (failover defines the recovery domain from it; a deleted domain is recreated from it)."""
    if row.kind != FabricKind.LIBVIRT:
        return ""
    fabric = open_fabric(current(), row)
    try:
        return str(fabric.xml(machine))  # type: ignore[attr-defined]
    finally:
        close = getattr(fabric, "close", None)
        if callable(close):
            close()


def define_recovery_domain(fabric: Fabric, rec: ItemRecord, name: str) -> bool:
    """Failover onto a libvirt site: define the recovery domain from the recorded XML with each disk
    target on its replica volume. False when this is not a libvirt site or no XML was recorded
    (the generic `create_machine` then builds one)."""
    define = getattr(fabric, "define_recovery", None)
    if not rec.domain_xml or not callable(define):
        return False
    define(rec.domain_xml, name, {d.label: d.cloud_path for d in rec.disks})
    return True


def isolated_network_name(test_machine: str) -> str:
    """The isolated network of a test failover's domain, named after it (clean-up finds it so)."""
    return f"{test_machine}-isolated"


def define_test_domain(fabric: Fabric, rec: ItemRecord, name: str, copies: dict[str, str]) -> bool:
    """Test failover onto a libvirt site: an isolated network made for it (no forward, no
    addresses) and the recorded XML defined under `name`, each disk target on the master target's
    copy at the point, every interface (MAC kept) on that network. Replication goes on meanwhile:
    the copies are the domain's own. False when this is not a libvirt site or no XML was recorded."""
    define = getattr(fabric, "define_recovery", None)
    isolate = getattr(fabric, "create_isolated_network", None)
    if not rec.domain_xml or not callable(define) or not callable(isolate):
        return False
    network = isolate(isolated_network_name(name))
    root = lx.parse(rec.domain_xml)
    used = {src.get("network", "") for src in root.findall("./devices/interface/source")}
    define(rec.domain_xml, name, copies, {n: network for n in used if n})
    return True


def remove_test_network(fabric: Fabric, name: str) -> None:
    """Test clean-up: the isolated network made for test domain `name` goes (a no-op elsewhere)."""
    remove = getattr(fabric, "remove_network", None)
    if callable(remove):
        remove(isolated_network_name(name))


def recreate_domain(fabric: Fabric, rec: ItemRecord, pool: str) -> Machine | None:
    """Reprotect onto a libvirt site whose protected domain was deleted: define it again from the
    recorded XML under its own name, each disk a new empty raw volume `<machine>_<disk>.img` in
    storage pool `pool` (raw, because the master target writes the disk's bytes straight into the
    file; a full sync fills it). None when this is not a libvirt site or no XML was recorded (the
    generic `create_machine` then builds one)."""
    define = getattr(fabric, "define_recovery", None)
    create_volume = getattr(fabric, "ensure_volume", None)  # a replayed step reuses its volume
    find_pool = getattr(fabric, "pool", None)
    if not rec.domain_xml or not callable(define) or not callable(create_volume) or not callable(find_pool):
        return None
    target = find_pool(pool)
    volumes = {
        d.label: str(create_volume(target, f"{rec.machine}_{d.label}.img", d.size, "raw")) for d in rec.disks
    }
    machine: Machine = define(rec.domain_xml, rec.machine, volumes)
    return machine


def _recorded_machine(rec: ItemRecord, found: Machine | None) -> Machine:
    """The protected domain as the LV checks need it: live when the site still has it (the same
    UUID), else from the record (a deleted domain is recreated under its name, which another
    domain may have taken meanwhile: LV-NAME)."""
    uuid = lx.parse(rec.domain_xml).findtext("./uuid", "") if rec.domain_xml else ""
    if found is not None and (not uuid or found.bios_uuid == uuid):
        return found
    return Machine(
        id=rec.machine,
        name=rec.machine,
        bios_uuid=uuid,
        os_type=OsType(rec.os_type),
        os_version=rec.os_version,
        power_state=PowerState.OFF,
        disks=tuple(
            Disk(uuid=d.onprem_uuid or d.label, label=d.label, size_bytes=d.size, backing=d.onprem_path)
            for d in rec.disks
        ),
    )


def libvirt_reprotect_problems(s: Session, item: repo.ItemSnapshot, args: dict[str, Any]) -> list[Problem]:
    """LV-* for a reprotect whose target (the on-premises site) is a libvirt host: the pool
    (`datastore`), the master target domain, the recorded domain. Empty for other fabric kinds."""
    rec = item.record
    # The alternate site a reprotect names (RP-VCENTER, a fabric's name or id), else the item's own.
    row = by_id_or_name(s, FabricRow, str(args.get("vcenter") or "") or rec.onprem_fabric)
    if row is None or row.kind != FabricKind.LIBVIRT:
        return []
    mt = repo.component(s, str(args.get("master_target", "")), ComponentKind.MASTER_TARGET)
    fabric = repo.site_fabric(rec.model_copy(update={"onprem_fabric": row.id}), Site.ONPREM)
    try:
        try:
            found = fabric.discover().machine(rec.machine)
        except FabricError:
            found = None  # check_libvirt_site says why (LV-REACH)
        domain = RecordedDomain(_recorded_machine(rec, found), rec.domain_xml or _minimal_xml(rec))
        target = LibvirtTarget(
            uri=str(row.connection.get("uri", "")),
            pool=str(args.get("datastore") or ""),
            master_target=mt.machine if mt is not None else "",
        )
        return check_libvirt_site(fabric, target, [domain])
    finally:
        close = getattr(fabric, "close", None)
        if callable(close):
            close()


def _minimal_xml(rec: ItemRecord) -> str:
    # An item protected before its XML was recorded: the type and networks are unknown, so only
    # the rules that need no XML judge it (LV-TYPE then checks the common x86_64/kvm).
    return f"<domain type='kvm'><name>{rec.machine}</name><os><type arch='x86_64'>hvm</type></os></domain>"
