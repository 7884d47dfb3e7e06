"""Building a new lab folder: the default two-site inventory and its sparse disk images.

The default lab is the smallest topology on which every REQUIREMENTS rule can be exercised: two
ESXi hosts sharing a VMFS and an NFS datastore, a Linux and a Windows master target that pass
every reprotect prerequisite, three Linux machines and one Windows machine to protect, and an
empty Azure-like cloud site. Every default is a passing one; `lab set` makes rules fail.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass
from pathlib import Path

from siterecovery.fabrics.base import (
    DatastoreType,
    FabricError,
    IpMode,
    OsType,
    ScsiType,
    SiteKind,
)
from siterecovery.fabrics.lab_model import (
    CLOUD,
    ONPREM,
    Accel,
    GuestKind,
    LabController,
    LabDatastore,
    LabDisk,
    LabHost,
    LabMachine,
    LabMount,
    LabNic,
    LabResourceGroup,
    LabSite,
    LabState,
)
from siterecovery.fabrics.lab_store import LabStore

DEFAULT_DISK_SIZE = 64 * 1024 * 1024
VM_MIN_DISK_SIZE = 64 * 1024 * 1024
RECOVERY_GROUP = "rg-recovery"
CONTROLLER_KEY = 1000
GIB = 1024**3


@dataclass(frozen=True)
class _MachinePlan:
    name: str
    os_type: OsType
    os_version: str
    host: str
    datastore: str
    master_target: bool = False
    static_ip: str = ""
    packages: tuple[str, ...] = ()


_LINUX = "Ubuntu 22.04 LTS"
_WINDOWS = "Windows Server 2019"
_PLANS: tuple[_MachinePlan, ...] = (
    _MachinePlan(
        "mt-linux", OsType.LINUX, _LINUX, "esx1", "ds-vmfs1", master_target=True, packages=("open-vm-tools",)
    ),
    _MachinePlan("mt-windows", OsType.WINDOWS, _WINDOWS, "esx1", "ds-vmfs1", master_target=True),
    _MachinePlan(
        "web1",
        OsType.LINUX,
        _LINUX,
        "esx1",
        "ds-vmfs1",
        static_ip="10.0.0.11",
        packages=("open-vm-tools", "NetworkManager", "nginx"),
    ),
    _MachinePlan(
        "db1",
        OsType.LINUX,
        _LINUX,
        "esx2",
        "ds-vmfs1",
        static_ip="10.0.0.12",
        packages=("open-vm-tools", "NetworkManager", "postgresql"),
    ),
    _MachinePlan("app1", OsType.LINUX, _LINUX, "esx2", "ds-nfs1", packages=("open-vm-tools",)),
    _MachinePlan("win1", OsType.WINDOWS, _WINDOWS, "esx1", "ds-vmfs1"),
)


def parse_size(text: str) -> int:
    """`64M`, `1G`, `512K` or a byte count → bytes (binary units, as qemu-img does)."""
    units = {"K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}
    raw = text.strip().upper().removesuffix("IB").removesuffix("B")
    factor = units.get(raw[-1:], 1)
    number = raw[:-1] if raw[-1:] in units else raw
    try:
        size = int(float(number) * factor)
    except ValueError:
        raise ValueError(f"size {text!r} is not a number with an optional K/M/G/T unit") from None
    if size <= 0 or size % 4096:
        raise ValueError(f"size {text!r} must be a positive multiple of 4 KiB")
    return size


def make_sparse_image(path: Path, size: int) -> None:
    """Create a sparse raw image; an existing file is an error (never clobber a disk)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        os.ftruncate(fd, size)
    finally:
        os.close(fd)


def onprem_disk_path(datastore: str, machine: str, label: str) -> str:
    return f"datastores/{datastore}/{machine}/{label}.img"


def cloud_disk_path(resource_group: str, machine: str, label: str) -> str:
    return f"cloud/{resource_group}/{machine}/{label}.img"


def _mac(n: int) -> str:
    return f"00:50:56:00:{(n >> 8) & 0xFF:02x}:{n & 0xFF:02x}"


def _machine(state: LabState, plan: _MachinePlan, disk_size: int) -> LabMachine:
    ident = state.new_id("vm")
    labels = ("disk0", "retention") if plan.master_target else ("disk0",)
    disks = [
        LabDisk(
            uuid=str(uuid.uuid4()),
            label=label,
            size_bytes=disk_size,
            backing=onprem_disk_path(plan.datastore, plan.name, label),
            datastore=plan.datastore,
            controller_key=CONTROLLER_KEY,
        )
        for label in labels
    ]
    nic = LabNic(
        name="eth0" if plan.os_type is OsType.LINUX else "Ethernet0",
        mac=_mac(state.next_id),
        network="VM Network",
    )
    if plan.static_ip:
        nic = nic.model_copy(
            update={"ip_mode": IpMode.STATIC, "address": plan.static_ip, "prefix": 24, "gateway": "10.0.0.1"}
        )
    return LabMachine(
        id=ident,
        name=plan.name,
        bios_uuid=str(uuid.uuid4()),
        os_type=plan.os_type,
        os_version=plan.os_version,
        host=plan.host,
        extra_config={"disk.EnableUUID": "TRUE"} if plan.master_target else {},
        controllers=[LabController(key=CONTROLLER_KEY, type=ScsiType.LSILOGIC)],
        disks=disks,
        nics=[nic],
        packages=list(plan.packages),
        workload=not plan.master_target,
    )


def default_state(disk_size: int) -> LabState:
    state = LabState(disk_size=disk_size, sites={})
    hosts = [LabHost(id=state.new_id("host"), name=name) for name in ("esx1", "esx2")]
    mounts = [LabMount(host=h.name, read_write=True) for h in hosts]
    datastores = [
        LabDatastore(
            id=state.new_id("datastore"),
            name="ds-vmfs1",
            type=DatastoreType.VMFS,
            capacity_bytes=500 * GIB,
            mounts=list(mounts),
        ),
        LabDatastore(
            id=state.new_id("datastore"),
            name="ds-nfs1",
            type=DatastoreType.NFS,
            capacity_bytes=1024 * GIB,
            mounts=list(mounts),
        ),
    ]
    machines = [_machine(state, plan, disk_size) for plan in _PLANS]
    state.sites[ONPREM] = LabSite(
        name=ONPREM, kind=SiteKind.VCENTER, hosts=hosts, datastores=datastores, machines=machines
    )
    state.sites[CLOUD] = LabSite(
        name=CLOUD,
        kind=SiteKind.CLOUD,
        location="westeurope",
        resource_groups=[LabResourceGroup(name=RECOVERY_GROUP, location="westeurope")],
    )
    return state


def create_lab(
    lab_dir: Path,
    disk_size: int = DEFAULT_DISK_SIZE,
    guest: GuestKind = GuestKind.PYTHON,
    accel: Accel = Accel.AUTO,
) -> LabState:
    """Create a new lab in `lab_dir` (empty or absent) with sparse disks of `disk_size` bytes whose
    machines run `guest` (a VM guest's ext4 wants disks of at least 64 MiB)."""
    lab_dir = Path(lab_dir)
    store = LabStore(lab_dir)
    if store.exists():
        raise FabricError(
            "lab-exists", f"{lab_dir} already holds a lab.", "Choose another folder or remove this one first."
        )
    lab_dir.mkdir(parents=True, exist_ok=True)
    if guest is GuestKind.VM and disk_size < VM_MIN_DISK_SIZE:
        raise FabricError(
            "disk-too-small",
            f"A VM guest's ext4 file system needs disks of at least {VM_MIN_DISK_SIZE >> 20} MiB.",
            "Create the lab with --disk-size 64M or more.",
        )
    state = default_state(disk_size)
    state.guest, state.vm_accel = guest, accel
    for machine in state.sites[ONPREM].machines:
        for disk in machine.disks:
            make_sparse_image(store.lab_dir / disk.backing, disk.size_bytes)
    (store.lab_dir / "cloud" / RECOVERY_GROUP).mkdir(parents=True, exist_ok=True)
    (store.lab_dir / "run").mkdir(exist_ok=True)
    store.create(state)
    return state
