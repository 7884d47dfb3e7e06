"""The embedded lab's inventory file as typed, validated records.

`inventory.json` holds both sites of a lab. These pydantic models are its schema: the lab store
reads and writes them, `lab set` edits them, and `LabFabric.discover` turns them into the frozen
`siterecovery.fabrics.base` values that the DR rules read. Disk backings are stored relative to
the lab folder so a lab can be copied or moved as a whole.
"""

from __future__ import annotations

from enum import StrEnum

from pydantic import BaseModel, Field

from siterecovery.fabrics.base import (
    REQUIRED_PRIVILEGES,
    CloudOrigin,
    DatastoreType,
    HypervisorKind,
    IpMode,
    LicenceEdition,
    OsType,
    PowerState,
    ScsiType,
    SiteKind,
)

SCHEMA_VERSION = 1
ONPREM = "onprem"
CLOUD = "cloud"

# What a read-only vCenter role can still do: look, but not browse datastores or change anything.
READONLY_PRIVILEGES: tuple[str, ...] = ("System.Anonymous", "System.Read", "System.View")


class GuestKind(StrEnum):
    """What runs on a lab machine: the Python guest writing its record log through the export, or a
    real Linux VM (QEMU) whose virtio disk is the export (siterecovery.lab.vm)."""

    PYTHON = "python"
    VM = "vm"


class Accel(StrEnum):
    """How QEMU runs a VM guest: KVM when it boots the guest (probed once), else TCG; or forced."""

    AUTO = "auto"
    KVM = "kvm"
    TCG = "tcg"


class AccountMode(StrEnum):
    FULL = "full"
    READONLY = "readonly"


class LabMount(BaseModel):
    host: str
    read_write: bool = True


class LabDatastore(BaseModel):
    id: str
    name: str
    type: DatastoreType
    accessible: bool = True
    capacity_bytes: int
    mounts: list[LabMount] = Field(default_factory=list)


class LabHost(BaseModel):
    id: str
    name: str
    kind: HypervisorKind = HypervisorKind.ESXI
    licence: LicenceEdition = LicenceEdition.ENTERPRISE
    version: str = "8.0.2"


class LabController(BaseModel):
    key: int
    type: ScsiType = ScsiType.LSILOGIC


class LabDisk(BaseModel):
    uuid: str
    label: str
    size_bytes: int
    backing: str  # relative to the lab folder
    datastore: str = ""
    controller_key: int = 1000
    # Set when storage migration moved this disk away from where its owner machine expects it
    # (RP-MT-MOVE): the path it had before the move.
    moved_from: str | None = None


class LabNic(BaseModel):
    name: str
    mac: str
    ip_mode: IpMode = IpMode.DHCP
    address: str = ""
    prefix: int = 0
    gateway: str = ""
    network: str = ""


class LabSnapshot(BaseModel):
    id: str
    name: str
    # Taken through the fabric: its disks' before-image logs can revert them (lab_snapshots.py).
    preserving: bool = False


class LabMachine(BaseModel):
    id: str
    name: str
    bios_uuid: str
    os_type: OsType
    os_version: str = ""
    power_state: PowerState = PowerState.OFF
    physical: bool = False
    host: str = ""
    tools_running: bool = True
    extra_config: dict[str, str] = Field(default_factory=dict)
    snapshots: list[LabSnapshot] = Field(default_factory=list)
    controllers: list[LabController] = Field(default_factory=list)
    disks: list[LabDisk] = Field(default_factory=list)
    nics: list[LabNic] = Field(default_factory=list)
    packages: list[str] = Field(default_factory=list)
    resource_group: str = ""
    origin: CloudOrigin | None = None
    on_lvm: bool = False
    template: str = ""
    # Lab-only: hidden from discovery (RP-VCENTER `mt-not-discovered`), and whether powering on
    # starts the guest workload (master targets run the real master-target service instead).
    visible: bool = True
    workload: bool = True
    guest_rate: float = 64.0  # log records per second the guest writes (0 = as fast as it can)
    guest_after: str = ""  # dependency mode: write record n only after this machine flushed n
    # Whose self-verifying log the guest continues ("" = its own name): a test-failover copy of
    # web1 is a different machine that holds web1's log.
    log_owner: str = ""
    # The guest that runs when it powers on; None: the log owner's guest, else the lab's default.
    guest: GuestKind | None = None
    # When the machine last powered on (AG-1: its agent registers `agent_registration_delay` later).
    powered_on_at: float | None = None


class LabResourceGroup(BaseModel):
    name: str
    location: str


class LabAccount(BaseModel):
    mode: AccountMode = AccountMode.FULL
    privileges: list[str] = Field(default_factory=lambda: list(REQUIRED_PRIVILEGES))


class LabSite(BaseModel):
    name: str
    kind: SiteKind
    reachable: bool = True
    location: str = ""
    agent_registration_delay: float = 2.0
    # The configuration server this site's mobility agents register with ("" = none: disks are only
    # exported, nothing replicates), and the file holding the registration passphrase.
    control_server: str = ""
    passphrase_file: str = ""
    account: LabAccount = Field(default_factory=LabAccount)
    hosts: list[LabHost] = Field(default_factory=list)
    datastores: list[LabDatastore] = Field(default_factory=list)
    machines: list[LabMachine] = Field(default_factory=list)
    resource_groups: list[LabResourceGroup] = Field(default_factory=list)

    def find_machine(self, ident: str) -> LabMachine | None:
        return next((m for m in self.machines if ident in (m.id, m.name)), None)

    def find_host(self, ident: str) -> LabHost | None:
        return next((h for h in self.hosts if ident in (h.id, h.name)), None)

    def find_datastore(self, ident: str) -> LabDatastore | None:
        return next((d for d in self.datastores if ident in (d.id, d.name)), None)


class LabState(BaseModel):
    version: int = SCHEMA_VERSION
    disk_size: int
    next_id: int = 100
    updated_at: float = 0.0
    guest: GuestKind = GuestKind.PYTHON  # the default guest of the lab's machines
    vm_accel: Accel = Accel.AUTO
    sites: dict[str, LabSite]

    def guest_of(self, machine: LabMachine) -> GuestKind:
        """A machine's guest: its own setting, else that of the machine whose log it continues (a
        failed-over copy keeps its name, a test copy names its owner), else the lab's default."""
        if machine.guest is not None:
            return machine.guest
        owner = machine.log_owner or machine.name
        for site in self.sites.values():
            for m in site.machines:
                if m.name == owner and m.guest is not None:
                    return m.guest
        return self.guest

    def site(self, name: str) -> LabSite:
        try:
            return self.sites[name]
        except KeyError:
            raise KeyError(f"lab has no site {name!r} (sites: {', '.join(self.sites)})") from None

    def new_id(self, prefix: str) -> str:
        self.next_id += 1
        return f"{prefix}-{self.next_id}"
