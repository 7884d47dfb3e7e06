"""The one interface every site provider implements, and the typed inventory it discovers.

A provider (`lab`, `vsphere`, `azure`) turns a site into an `Inventory` of frozen values
and performs the few operations the DR workflows need. Prerequisite checks (dr.checks) read only
these values, so every rule works the same on every provider.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Protocol, runtime_checkable


class SiteKind(StrEnum):
    VCENTER = "vcenter"  # on-premises, vCenter-like
    CLOUD = "cloud"  # Azure-like recovery site


class HypervisorKind(StrEnum):
    ESXI = "esxi"
    HYPERV = "hyperv"
    PHYSICAL = "physical"
    WORKSTATION = "workstation"
    KVM = "kvm"  # a libvirt host (QEMU with KVM or TCG)


class LicenceEdition(StrEnum):
    FREE = "free"
    EVALUATION = "evaluation"
    STANDARD = "standard"
    ENTERPRISE = "enterprise"


class DatastoreType(StrEnum):
    VMFS = "vmfs"
    NFS = "nfs"
    # Reported as what they are, so a host holding only these is told to attach VMFS (RP-MT-VMFS),
    # not to fix credentials as if discovery had seen nothing.
    VSAN = "vsan"
    VVOL = "vvol"
    OTHER = "other"


class OsType(StrEnum):
    LINUX = "linux"
    WINDOWS = "windows"


class PowerState(StrEnum):
    ON = "on"
    OFF = "off"


class ScsiType(StrEnum):
    LSILOGIC = "lsilogic"
    PVSCSI = "pvscsi"


class IpMode(StrEnum):
    STATIC = "static"
    DHCP = "dhcp"


class CloudOrigin(StrEnum):
    """How a cloud machine came to be (RP-ELIGIBLE: only `failover` may be reprotected)."""

    FAILOVER = "failover"
    MIGRATION = "migration"
    MANUAL = "manual"


# Privileges a vCenter account needs for reprotect and failback (RP-PERMS); vSphere's own names.
REQUIRED_PRIVILEGES: tuple[str, ...] = (
    "System.View",
    "Datastore.Browse",
    "Datastore.AllocateSpace",
    "VirtualMachine.Inventory.Create",
    "VirtualMachine.Config.AddExistingDisk",
    "VirtualMachine.Config.RemoveDisk",
    "VirtualMachine.Interact.PowerOn",
    "VirtualMachine.Interact.PowerOff",
    "VirtualMachine.State.CreateSnapshot",
    "VirtualMachine.State.RevertToSnapshot",
    "VirtualMachine.State.RemoveSnapshot",
)


@dataclass(frozen=True)
class DatastoreMount:
    host: str  # host name
    read_write: bool


@dataclass(frozen=True)
class Datastore:
    id: str
    name: str
    type: DatastoreType
    accessible: bool
    capacity_bytes: int
    free_bytes: int
    mounts: tuple[DatastoreMount, ...] = ()

    def writable_on(self, host: str) -> bool:
        return any(m.host == host and m.read_write for m in self.mounts)

    def mounted_on(self, host: str) -> bool:
        return any(m.host == host for m in self.mounts)


@dataclass(frozen=True)
class Host:
    id: str
    name: str
    kind: HypervisorKind
    licence: LicenceEdition
    version: str = ""
    cpus: int = 0
    memory_bytes: int = 0
    # Domain types the host runs, as "arch/type" ("x86_64/kvm", "x86_64/qemu"): libvirt capabilities.
    domain_types: tuple[str, ...] = ()


@dataclass(frozen=True)
class ScsiController:
    key: int
    type: ScsiType


@dataclass(frozen=True)
class Disk:
    uuid: str
    label: str
    size_bytes: int
    backing: str  # image file path (lab), "[datastore] path.vmdk" (vSphere)
    datastore: str = ""  # datastore name
    controller_key: int = 0
    bus: str = ""  # libvirt: the target bus (virtio, sata, scsi, ide)


@dataclass(frozen=True)
class Nic:
    name: str
    mac: str
    ip_mode: IpMode
    address: str = ""
    prefix: int = 0
    gateway: str = ""
    network: str = ""


@dataclass(frozen=True)
class Snapshot:
    id: str
    name: str


@dataclass(frozen=True)
class Machine:
    id: str
    name: str
    bios_uuid: str
    os_type: OsType
    os_version: str
    power_state: PowerState
    physical: bool = False
    host: str = ""  # host name (on-premises)
    tools_running: bool = True
    extra_config: Mapping[str, str] = field(default_factory=dict)
    snapshots: tuple[Snapshot, ...] = ()
    controllers: tuple[ScsiController, ...] = ()
    disks: tuple[Disk, ...] = ()
    nics: tuple[Nic, ...] = ()
    packages: tuple[str, ...] = ()
    resource_group: str = ""  # cloud sites
    origin: CloudOrigin | None = None  # cloud sites: how the machine came to be
    on_lvm: bool = False  # Linux root file system on LVM (RP-MT-LVM for master targets)
    template: str = ""  # template it was cloned from, if any
    boot_time: float | None = None  # epoch seconds of the last power-on; None when off or unknown


@dataclass(frozen=True)
class Network:
    """A virtual network a site offers its machines (libvirt networks)."""

    name: str
    active: bool
    bridge: str = ""


@dataclass(frozen=True)
class ResourceGroup:
    name: str
    location: str


@dataclass(frozen=True)
class Inventory:
    """Everything discovered on one site at one instant."""

    site: str
    kind: SiteKind
    discovered_at: float  # epoch seconds
    hosts: tuple[Host, ...] = ()
    datastores: tuple[Datastore, ...] = ()
    machines: tuple[Machine, ...] = ()
    resource_groups: tuple[ResourceGroup, ...] = ()
    networks: tuple[Network, ...] = ()
    privileges: frozenset[str] = frozenset()
    # Why discovery saw less than it should (e.g. a read-only account sees no datastores).
    warnings: tuple[str, ...] = ()

    def machine(self, ident: str) -> Machine | None:
        return next((m for m in self.machines if ident in (m.id, m.name)), None)

    def host(self, ident: str) -> Host | None:
        return next((h for h in self.hosts if ident in (h.id, h.name)), None)

    def datastore(self, ident: str) -> Datastore | None:
        return next((d for d in self.datastores if ident in (d.id, d.name)), None)

    def missing_privileges(self) -> tuple[str, ...]:
        return tuple(p for p in REQUIRED_PRIVILEGES if p not in self.privileges)


@dataclass(frozen=True)
class DiskSpec:
    label: str
    size_bytes: int
    backing: str = ""  # existing image to use; empty = create a new sparse one


@dataclass(frozen=True)
class MachineSpec:
    name: str
    host: str
    datastore: str
    os_type: OsType
    os_version: str = ""
    disks: tuple[DiskSpec, ...] = ()
    nics: tuple[Nic, ...] = ()


class FabricError(Exception):
    """A provider operation failed; `code` is stable (e.g. `mt-disks-moved`)."""

    def __init__(self, code: str, message: str, remediation: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.remediation = remediation


@runtime_checkable
class GuestOracle(Protocol):
    """A fabric whose guests judge their own crash consistency (the lab's log writer and VM
    guests, and libvirt domains booting the VM guest image). The workflows ask it after a failover
    or failback; a fabric without such guests (a real vCenter, Azure) does not implement it, and
    one that has them for some machines only answers "observable: False" for the others: the
    verdict is then "not observable"."""

    def set_log_owner(self, machine: str, owner: str) -> None:
        """A copy of `owner`'s disks (test failover) continues `owner`'s log."""

    def guest_flushed(self, machine: str) -> int | None:
        """The last log record the machine's guest knew durable (after a clean shutdown)."""

    def guest_start_verdict(self, machine: str, since: float) -> dict[str, object] | None:
        """The start-up verdict of the guest started after `since`, once it has reported one."""


@runtime_checkable
class Fabric(Protocol):
    """A site: discovery plus the operations reprotect, failover and failback perform."""

    name: str

    def discover(self) -> Inventory: ...

    def power_on(self, machine: str) -> None: ...

    def power_off(self, machine: str) -> None: ...

    def create_machine(self, spec: MachineSpec) -> Machine: ...

    def delete_machine(self, machine: str) -> None: ...

    def attach_disks(self, machine: str, disks: Sequence[Disk]) -> None: ...

    def detach_disks(self, machine: str, disk_uuids: Sequence[str]) -> tuple[Disk, ...]: ...

    def consolidate_snapshots(self, machine: str) -> int: ...

    # A failover keeps the recovery machine's point changeable until commit with a snapshot taken
    # before it boots: reverting to it undoes everything the machine wrote since.
    def create_snapshot(self, machine: str, name: str) -> Snapshot: ...

    def revert_to_snapshot(self, machine: str, snapshot_id: str) -> None:
        """Return the machine's disks to the snapshot; the snapshot stays (vSphere's semantics)."""

    def remove_snapshot(self, machine: str, snapshot_id: str) -> None:
        """Delete the snapshot, keeping the machine's current state (its changes merge down)."""

    def move_storage(self, machine: str, datastore: str) -> None: ...
