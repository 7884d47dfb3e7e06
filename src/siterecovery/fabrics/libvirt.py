"""The libvirt provider: a KVM/QEMU host (`qemu:///system`, `qemu+ssh://…`) as a site.

`LibvirtFabric` implements `Fabric` through libvirt-python. Discovery maps domains (disks with
their file, block or network sources and bus, power state, snapshots, interfaces), storage pools
(as datastores), networks and the host's capabilities into the `Inventory` values; reading the XML
is `libvirt_xml`. Every libvirt error becomes a `FabricError` with a stable code. Operations are
safe to replay like the other providers': starting a running domain or attaching an attached disk
does nothing; each snapshot create makes a new one.

Snapshots are libvirt's internal snapshots on qcow2 disks; a stopped domain whose disks are all raw
files (replica volumes) gets a qcow2 overlay per disk instead (`libvirt_overlay`: a failover's
recovery domain runs on them until commit, so its point can still change). Other domains with a
raw disk are refused with `libvirt-snapshot-unsupported` before anything is taken. The lab's VM
guest image booted as a domain makes it a `GuestOracle` (`lab.libvirt_oracle`, a layer above).
Disk changes go to the persistent definition and, on a running domain, to the live one as well.
"""

from __future__ import annotations

import contextlib
import os
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Sequence
from dataclasses import replace
from functools import partial
from typing import TypeVar

import libvirt
from siterecovery.fabrics import libvirt_capture, libvirt_overlay
from siterecovery.fabrics import libvirt_xml as lx
from siterecovery.fabrics.base import (
    Datastore,
    DatastoreMount,
    DatastoreType,
    Disk,
    FabricError,
    Host,
    HypervisorKind,
    Inventory,
    LicenceEdition,
    Machine,
    MachineSpec,
    Network,
    PowerState,
    SiteKind,
    Snapshot,
)

T = TypeVar("T")

_POOL_TYPES = {"netfs": DatastoreType.NFS}
_NEW_MEMORY_MIB = 512
_UNDEFINE = libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA | libvirt.VIR_DOMAIN_UNDEFINE_NVRAM


def _quiet(_ctx: object, _err: object) -> None:
    """libvirt prints every error to stderr as well as raising it; the fabric reports them itself."""


libvirt.registerErrorHandler(_quiet, None)


def _version(v: int) -> str:
    return f"{v // 1_000_000}.{v // 1000 % 1000}.{v % 1000}"


class LibvirtFabric:
    """One libvirt connection (one host) as a site."""

    def __init__(
        self, uri: str, *, name: str | None = None, site: str = "onprem", domain_type: str = ""
    ) -> None:
        self.uri = uri
        self.name = name or uri
        self.site = site
        # The type of domain create_machine defines ("kvm" or "qemu"); empty: kvm when offered.
        self.domain_type = domain_type
        self._conn: libvirt.virConnect | None = None

    # ---- connection --------------------------------------------------------------------------

    @property
    def conn(self) -> libvirt.virConnect:
        if self._conn is None:
            try:
                self._conn = libvirt.open(self.uri)
            except libvirt.libvirtError as exc:
                raise FabricError(
                    "libvirt-unreachable",
                    f"Cannot connect to libvirt at {self.uri}: {exc.get_error_message()}.",
                    "Check that libvirtd (or virtqemud) runs on the host and that the URI, its socket "
                    "or SSH access are right.",
                ) from exc
        return self._conn

    def close(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(libvirt.libvirtError):
                self._conn.close()
            self._conn = None

    def _call(self, what: str, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except libvirt.libvirtError as exc:
            raise FabricError(
                "libvirt-operation-failed",
                f"libvirt could not {what}: {exc.get_error_message()}.",
                "Read the libvirtd log on the host, fix the cause and retry.",
            ) from exc

    @property
    def local(self) -> bool:
        """The URI names no remote host (`qemu:///system`, `qemu:///system?socket=…`)."""
        return self.uri.split("://", 1)[-1].startswith("/")

    # ---- discovery ---------------------------------------------------------------------------

    def discover(self) -> Inventory:
        conn = self.conn
        host = self._host()
        pools = self._call("list storage pools", lambda: conn.listAllStoragePools(0))
        datastores = tuple(self._datastore(p, host.name) for p in pools)
        networks = tuple(
            Network(n.name(), bool(n.isActive()), self._bridge(n))
            for n in self._call("list networks", lambda: conn.listAllNetworks(0))
        )
        domains = self._call("list domains", lambda: conn.listAllDomains(0))
        machines = tuple(self._machine(d, host.name) for d in domains)
        return Inventory(
            site=self.site,
            kind=SiteKind.VCENTER,  # an on-premises site, as a vCenter is
            discovered_at=time.time(),
            hosts=(host,),
            datastores=datastores,
            machines=machines,
            networks=networks,
        )

    def _host(self) -> Host:
        conn = self.conn
        caps = lx.parse(self._call("read host capabilities", conn.getCapabilities))
        types = sorted(
            {
                f"{arch.get('name')}/{dom.get('type')}"
                for arch in caps.findall("./guest/arch")
                for dom in arch.findall("domain")
            }
        )
        info = self._call("read host information", conn.getInfo)
        name = self._call("read host name", conn.getHostname)
        version = f"libvirt {_version(self._call('read version', conn.getLibVersion))}"
        version += f", QEMU {_version(self._call('read hypervisor version', conn.getVersion))}"
        # KVM has no licence editions: reported as one no rule refuses (RP-MT-LICENCE is vSphere's).
        return Host(
            name, name, HypervisorKind.KVM, LicenceEdition.ENTERPRISE, version,
            cpus=int(info[2]), memory_bytes=int(info[1]) << 20, domain_types=tuple(types),
        )  # fmt: skip

    @staticmethod
    def _bridge(net: libvirt.virNetwork) -> str:
        try:
            return str(net.bridgeName())
        except libvirt.libvirtError:
            return ""  # networks without a bridge (macvtap, hostdev)

    def _datastore(self, pool: libvirt.virStoragePool, host: str) -> Datastore:
        active = bool(pool.isActive())
        root = lx.parse(self._call(f"read pool {pool.name()}", lambda: pool.XMLDesc(0)))
        _, capacity, _, available = pool.info() if active else (0, 0, 0, 0)
        # A pool on this machine's own libvirtd is checked for writing (a directory libvirtd can
        # list but not write into fails only at the first volume); a remote one counts as writable
        # when active, libvirt having no read-only pools.
        path = root.findtext("./target/path", "")
        writable = active and (not self.local or not path or os.access(path, os.W_OK))
        return Datastore(
            pool.UUIDString(),
            pool.name(),
            _POOL_TYPES.get(root.get("type", ""), DatastoreType.OTHER),
            active,
            int(capacity),
            int(available),
            (DatastoreMount(host, writable),),
        )

    def _machine(self, dom: libvirt.virDomain, host: str) -> Machine:
        root = lx.parse(self._call(f"read domain {dom.name()}", lambda: dom.XMLDesc(0)))
        active = bool(dom.isActive())
        os_type, os_version = lx.os_type(root)
        snaps = self._call(f"list snapshots of {dom.name()}", lambda: dom.listAllSnapshots(0))
        return Machine(
            id=dom.UUIDString(),
            name=dom.name(),
            bios_uuid=dom.UUIDString(),
            os_type=os_type,
            os_version=os_version,
            power_state=PowerState.ON if active else PowerState.OFF,
            host=host,
            tools_running=active,
            snapshots=tuple(Snapshot(s.getName(), s.getName()) for s in snaps) + self._overlay_snapshot(dom),
            disks=self._disks(dom, root, active),
            nics=lx.nics(root),
        )

    def _disks(self, dom: libvirt.virDomain, root: ET.Element, active: bool) -> tuple[Disk, ...]:
        # A disk whose source is the agent's export is reported by the volume under it (capture).
        captured = libvirt_capture.read(dom)
        out: list[Disk] = []
        for disk in lx.disks(root, lambda src: self._size_and_pool(dom, src, active)):
            volume = captured.get(disk.label, "")
            if volume and disk.backing.startswith("nbd+unix://"):
                size, pool = self._size_and_pool(
                    dom, lx.DiskSource(disk.label, disk.bus, "file", volume, "raw"), False
                )
                disk = replace(
                    disk, uuid=volume, backing=volume, size_bytes=size or disk.size_bytes, datastore=pool
                )
            out.append(disk)
        return tuple(out)

    @staticmethod
    def _overlay_snapshot(dom: libvirt.virDomain) -> tuple[Snapshot, ...]:
        overlay = libvirt_overlay.read(dom)
        return (Snapshot(overlay.id, overlay.name),) if overlay is not None else ()

    def _size_and_pool(self, dom: libvirt.virDomain, src: lx.DiskSource, active: bool) -> tuple[int, str]:
        if src.kind in ("file", "block") and src.path:
            try:
                vol = self.conn.storageVolLookupByPath(src.path)
                return int(vol.info()[1]), vol.storagePoolLookupByVolume().name()
            except libvirt.libvirtError:
                pass  # not in any pool: ask the domain
        if active:
            try:
                return int(dom.blockInfo(src.target)[0]), ""
            except libvirt.libvirtError:
                pass
        return 0, ""

    # ---- lookups -----------------------------------------------------------------------------

    def domain(self, machine: str) -> libvirt.virDomain:
        conn = self.conn
        for lookup in (conn.lookupByUUIDString, conn.lookupByName):
            try:
                return lookup(machine)
            except libvirt.libvirtError:
                continue
        raise FabricError(
            "machine-not-found",
            f"Site {self.name} has no domain {machine}.",
            "Rediscover the site and choose a domain it has.",
        )

    def xml(self, machine: str, inactive: bool = True) -> str:
        """The domain's definition (the persistent one unless `inactive` is False)."""
        dom = self.domain(machine)
        flags = libvirt.VIR_DOMAIN_XML_INACTIVE if inactive else 0
        return str(self._call(f"read domain {machine}", lambda: dom.XMLDesc(flags)))

    def pool(self, name: str) -> libvirt.virStoragePool:
        try:
            pool = self.conn.storagePoolLookupByName(name)
        except libvirt.libvirtError as exc:
            raise FabricError(
                "datastore-not-found",
                f"Site {self.name} has no storage pool {name}.",
                "Define and start the pool (`virsh pool-define-as`), or choose one the site has.",
            ) from exc
        if not pool.isActive():
            raise FabricError(
                "datastore-inaccessible",
                f"Storage pool {name} on {self.name} is not active.",
                f"Start it (`virsh pool-start {name}`).",
            )
        return pool

    # ---- power -------------------------------------------------------------------------------

    def power_on(self, machine: str) -> None:
        dom = self.domain(machine)
        if not dom.isActive():
            self._call(f"start {machine}", dom.create)

    def power_off(self, machine: str) -> None:
        # A hard stop, as vSphere's power off: what the guest had not flushed is lost, which a
        # crash-consistent replica must survive anyway.
        dom = self.domain(machine)
        if dom.isActive():
            self._call(f"stop {machine}", dom.destroy)

    # ---- machines ----------------------------------------------------------------------------

    def create_machine(self, spec: MachineSpec) -> Machine:
        self._refuse_existing(spec.name)
        pool = self.pool(spec.datastore)
        sources: list[tuple[str, str]] = []
        for disk in spec.disks:
            if disk.backing:
                sources.append((disk.backing, self._format(disk.backing)))
            else:
                sources.append(
                    (self.create_volume(pool, f"{spec.name}_{disk.label}.qcow2", disk.size_bytes), "qcow2")
                )
        root = ET.Element("domain", type=self.domain_type or self._default_type())
        ET.SubElement(root, "name").text = spec.name
        ET.SubElement(root, "memory", unit="MiB").text = str(_NEW_MEMORY_MIB)
        ET.SubElement(root, "vcpu").text = "1"
        os_el = ET.SubElement(root, "os")
        ET.SubElement(os_el, "type", arch="x86_64", machine="q35").text = "hvm"
        ET.SubElement(root, "on_reboot").text = "restart"
        devices = ET.SubElement(root, "devices")
        used: list[str] = []
        for source, fmt in sources:
            target = lx.next_target(used, "virtio")
            used.append(target)
            devices.append(ET.fromstring(lx.disk_xml(source, target, "virtio", fmt)))
        for nic in spec.nics:
            iface = ET.SubElement(devices, "interface", type="network")
            ET.SubElement(iface, "source", network=nic.network or "default")
            if nic.mac:
                ET.SubElement(iface, "mac", address=nic.mac)
            ET.SubElement(iface, "model", type="virtio")
        return self.define(ET.tostring(root, encoding="unicode"))

    def define(self, xml: str) -> Machine:
        """Define a domain from its XML (a recovery domain from the protected domain's record)."""
        name = lx.parse(xml).findtext("name", "")
        self._refuse_existing(name)
        dom = self._call(f"define domain {name}", lambda: self.conn.defineXML(xml))
        return self._machine(dom, self._host().name)

    def define_recovery(
        self, recorded_xml: str, name: str, volumes: dict[str, str], networks: dict[str, str] | None = None
    ) -> Machine:
        """The recovery domain of a failover: the protected domain's recorded XML under `name`, each
        disk target pointing at its replica volume (`volumes`: target -> path), its interfaces (MACs
        and models) kept and their networks mapped through `networks`."""
        xml = lx.replace_disk_sources(lx.for_new_domain(recorded_xml, name, networks), volumes)
        return self.define(xml)

    def _refuse_existing(self, name: str) -> None:
        try:
            self.conn.lookupByName(name)
        except libvirt.libvirtError:
            return
        raise FabricError(
            "machine-exists",
            f"Site {self.name} already has a domain named {name}.",
            "Choose another name or undefine the existing domain first.",
        )

    def _default_type(self) -> str:
        return "kvm" if any(t.endswith("/kvm") for t in self._host().domain_types) else "qemu"

    def create_volume(self, pool: libvirt.virStoragePool, name: str, size: int, fmt: str = "qcow2") -> str:
        """A new volume in the pool; its path."""
        vol_xml = (
            f"<volume><name>{name}</name><capacity unit='bytes'>{size}</capacity>"
            f"<target><format type='{fmt}'/></target></volume>"
        )
        vol = self._call(f"create volume {name} in {pool.name()}", lambda: pool.createXML(vol_xml, 0))
        return str(vol.path())

    def ensure_volume(self, pool: libvirt.virStoragePool, name: str, size: int, fmt: str = "qcow2") -> str:
        """The volume `name` of the pool, created when it is not there yet (a job step run again
        after a crash finds the one it created before); its path."""
        with contextlib.suppress(libvirt.libvirtError):
            pool.refresh(0)  # a volume created since the pool's last look is listed only after it
            return str(pool.storageVolLookupByName(name).path())
        return self.create_volume(pool, name, size, fmt)

    def _format(self, path: str) -> str:
        try:
            vol = self.conn.storageVolLookupByPath(path)
        except libvirt.libvirtError:
            return "raw"
        fmt = lx.parse(vol.XMLDesc(0)).find("./target/format")
        return fmt.get("type", "raw") if fmt is not None else "raw"

    def delete_machine(self, machine: str) -> None:
        dom = self.domain(machine)
        m = self._machine(dom, "")
        if m.power_state is PowerState.ON:
            raise FabricError(
                "machine-powered-on",
                f"Domain {m.name} is powered on.",
                f"Power {m.name} off before deleting it.",
            )
        # The volumes the domain owns (named after it, as create_machine names them) go with it;
        # disks it only borrows (another domain's, attached to a master target) stay.
        # Its overlays (a recovery domain before commit) are its own; the volumes under them are not.
        overlay = libvirt_overlay.read(dom)
        tops = [top for _, top in overlay.disks.values()] if overlay is not None else []
        owned = [
            d.backing
            for d in m.disks
            if d.datastore and d.backing.rsplit("/", 1)[-1].startswith(f"{m.name}_") and d.backing not in tops
        ]
        self._call(f"undefine {m.name}", lambda: dom.undefineFlags(_UNDEFINE))
        for path in tops:
            libvirt_overlay.delete_volume(self.conn, path)
        for path in owned:
            vol = self._call(f"find volume {path}", partial(self.conn.storageVolLookupByPath, path))
            self._call(f"delete volume {path}", partial(vol.delete, 0))

    # ---- disks -------------------------------------------------------------------------------

    def _flags(self, dom: libvirt.virDomain) -> int:
        live = libvirt.VIR_DOMAIN_AFFECT_LIVE if dom.isActive() else 0
        return int(libvirt.VIR_DOMAIN_AFFECT_CONFIG | live)

    def attach_disks(self, machine: str, disks: Sequence[Disk]) -> None:
        dom = self.domain(machine)
        root = lx.parse(self.xml(machine))
        present = lx.disk_sources(root)
        for disk in disks:
            if any(s.identity == disk.uuid for s in present):
                continue  # attached already: a replay
            bus = disk.bus or "virtio"
            target = lx.next_target([s.target for s in present], bus)
            limit = lx.BUS_LIMITS.get(bus, 28)
            if sum(1 for s in present if s.bus == bus) >= limit:
                raise FabricError(
                    "libvirt-disk-limit",
                    f"Domain {machine} has {limit} {bus} disks, the most it takes.",
                    f"Detach disks from {machine} or use another master target.",
                )
            xml = lx.disk_xml(disk.backing or disk.uuid, target, bus, self._format(disk.backing or disk.uuid))
            self._call(
                f"attach {disk.label} to {machine}", partial(dom.attachDeviceFlags, xml, self._flags(dom))
            )
            present.append(lx.DiskSource(target, bus, "file", disk.backing or disk.uuid, ""))

    def detach_disks(self, machine: str, disk_uuids: Sequence[str]) -> tuple[Disk, ...]:
        dom = self.domain(machine)
        root = lx.parse(self.xml(machine))
        by_id = {s.identity: s for s in lx.disk_sources(root)}
        unknown = [u for u in disk_uuids if u not in by_id]
        if unknown:
            raise FabricError(
                "disk-not-attached",
                f"Domain {machine} has no disk {', '.join(unknown)}.",
                f"Rediscover the site and detach only disks attached to {machine}.",
            )
        m = self._machine(dom, "")
        detached = tuple(d for d in m.disks if d.uuid in disk_uuids)
        for disk_el in root.findall("./devices/disk"):
            target = disk_el.find("target")
            src = next(
                (s for s in by_id.values() if target is not None and s.target == target.get("dev")), None
            )
            if src is None or src.identity not in disk_uuids:
                continue
            xml = ET.tostring(disk_el, encoding="unicode")
            self._call(
                f"detach {src.target} from {machine}",
                partial(dom.detachDeviceFlags, xml, self._flags(dom)),
            )
        return detached

    def set_disk_sources(self, machine: str, sources: dict[str, str]) -> bool:
        """Point disk targets at new sources (a file, or `nbd+unix://EXPORT@SOCKET` for the agent's
        export) in the persistent definition; the volume under an export is recorded
        (`libvirt_capture`), so discovery still reports the disk by its volume. True when the
        domain uses them at once (it was stopped); a running domain picks them up at its next power cycle."""
        dom = self.domain(machine)
        before = self.xml(machine)
        xml = lx.replace_disk_sources(before, sources)
        self._call(f"redefine {machine}", lambda: self.conn.defineXML(xml))
        known = libvirt_capture.read(dom)
        record = libvirt_capture.updated(lx.disk_sources(lx.parse(before)), known, sources)
        if record != known:
            self._call(f"record the capture of {machine}", partial(libvirt_capture.set_record, dom, record))
        return not dom.isActive()

    # ---- snapshots ---------------------------------------------------------------------------

    def _snapshot(self, dom: libvirt.virDomain, snapshot_id: str) -> libvirt.virDomainSnapshot:
        try:
            return dom.snapshotLookupByName(snapshot_id, 0)
        except libvirt.libvirtError as exc:
            raise FabricError(
                "snapshot-not-found",
                f"Domain {dom.name()} has no snapshot {snapshot_id}.",
                "Rediscover the site; the snapshot may have been removed.",
            ) from exc

    def create_snapshot(self, machine: str, name: str) -> Snapshot:
        dom = self.domain(machine)
        sources = lx.disk_sources(lx.parse(self.xml(machine)))
        raw = [s.target for s in sources if s.format != "qcow2"]
        if libvirt_overlay.read(dom) is not None:
            # Its disks are qcow2 overlays now, but an internal snapshot of them would not be
            # undone by dropping or merging the overlays: one overlay snapshot at a time.
            raise FabricError(
                "libvirt-snapshot-unsupported",
                f"Domain {machine} already runs on an overlay snapshot; it takes one at a time.",
                f"Remove the snapshot of {machine} first.",
            )
        if sources and all(s.kind == "file" and s.format == "raw" for s in sources):
            overlay = libvirt_overlay.create(self.conn, dom, name, sources, self._call)
            return Snapshot(overlay.id, name)
        if raw:
            raise FabricError(
                "libvirt-snapshot-unsupported",
                f"Disks {', '.join(raw)} of {machine} are not qcow2, and libvirt takes internal snapshots "
                "of qcow2 disks only.",
                f"Convert the disks of {machine} to qcow2, or fail over without a change point.",
            )
        # A unique name per create, as vSphere gives each snapshot its own id.
        snap_name = f"{name}-{time.time_ns()}"
        xml = f"<domainsnapshot><name>{snap_name}</name></domainsnapshot>"
        snap = self._call(
            f"snapshot {machine}",
            lambda: dom.snapshotCreateXML(xml, libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_ATOMIC),
        )
        return Snapshot(snap.getName(), name)

    def revert_to_snapshot(self, machine: str, snapshot_id: str) -> None:
        dom = self.domain(machine)
        overlay = libvirt_overlay.read(dom)
        if overlay is not None and overlay.id == snapshot_id:
            libvirt_overlay.revert(self.conn, dom, overlay, self._call)
            return
        snap = self._snapshot(dom, snapshot_id)
        self._call(f"revert {machine} to {snapshot_id}", lambda: dom.revertToSnapshot(snap, 0))

    def remove_snapshot(self, machine: str, snapshot_id: str) -> None:
        dom = self.domain(machine)
        overlay = libvirt_overlay.read(dom)
        if overlay is not None and overlay.id == snapshot_id:
            libvirt_overlay.remove(self.conn, dom, overlay, self._call)
            return
        snap = self._snapshot(dom, snapshot_id)
        self._call(f"remove snapshot {snapshot_id} of {machine}", lambda: snap.delete(0))

    def consolidate_snapshots(self, machine: str) -> int:
        dom = self.domain(machine)
        snaps = self._call(f"list snapshots of {machine}", lambda: dom.listAllSnapshots(0))
        for snap in snaps:
            self._call(f"remove snapshot {snap.getName()}", partial(snap.delete, 0))
        overlay = libvirt_overlay.read(dom)
        if overlay is not None:
            libvirt_overlay.remove(self.conn, dom, overlay, self._call)
        return len(snaps) + (overlay is not None)

    # ---- isolated networks (test failover) -----------------------------------------------------

    def create_isolated_network(self, name: str) -> str:
        """A network with no forward and no addresses (a bridge of its own that reaches nothing
        outside), for a test failover's domain; one already there (a replayed step) is kept."""
        with contextlib.suppress(libvirt.libvirtError):
            if self.conn.networkLookupByName(name).isActive():
                return name
        xml = f"<network><name>{name}</name></network>"
        self._call(f"create the isolated network {name}", lambda: self.conn.networkCreateXML(xml))
        return name

    def remove_network(self, name: str) -> None:
        try:
            net = self.conn.networkLookupByName(name)
        except libvirt.libvirtError:
            return  # gone already
        persistent = net.isPersistent()
        if net.isActive():
            self._call(f"stop network {name}", net.destroy)
        if persistent:
            self._call(f"undefine network {name}", net.undefine)

    # ---- storage -----------------------------------------------------------------------------

    def move_storage(self, machine: str, datastore: str) -> None:
        dom = self.domain(machine)
        if dom.isActive():
            raise FabricError(
                "machine-powered-on",
                f"Domain {machine} is running; its disks move only while it is stopped.",
                f"Power {machine} off, then move its storage.",
            )
        pool = self.pool(datastore)
        moved: dict[str, str] = {}
        old: list[libvirt.virStorageVol] = []
        for src in lx.disk_sources(lx.parse(self.xml(machine))):
            if src.kind != "file":
                continue
            vol = self._call(f"find volume {src.path}", partial(self.conn.storageVolLookupByPath, src.path))
            if vol.storagePoolLookupByVolume().name() == datastore:
                continue
            vol_xml = vol.XMLDesc(0)
            new = self._call(f"copy {src.path} to {datastore}", partial(pool.createXMLFrom, vol_xml, vol, 0))
            moved[src.target] = str(new.path())
            old.append(vol)
        if moved:
            self.set_disk_sources(machine, moved)
            for vol in old:
                self._call(f"delete {vol.path()}", partial(vol.delete, 0))
