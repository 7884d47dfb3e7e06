"""The few Azure Resource Manager operations the Azure fabric needs, as one narrow interface.

`Arm` is what `AzureFabric` (azure.py) calls: list virtual machines, managed disks and NICs of
one resource group, create managed disks by importing page blobs, create and delete NICs and VMs,
start and deallocate VMs, disk snapshots, and the facts prerequisite checks read (VM sizes, the
subscription's usage against its quotas). Every answer is a frozen value, never an SDK model, so
the fabric and the checks do not depend on the SDK's shapes. `SdkArm` implements it with the
Azure SDK (azure-mgmt-compute/-network/-resource, azure-identity); the tests implement it with a
fake whose disks are page blobs in Azurite (tests/azure/fake_arm.py), and the contract tests run
the same cases against `SdkArm` when a subscription's credentials are set.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

from siterecovery.fabrics.base import IpMode, OsType, PowerState

ORIGIN_TAG = "siterecovery-origin"  # how a VM came to be (CloudOrigin), set on VMs a failover creates


@dataclass(frozen=True)
class ArmDisk:
    id: str
    name: str
    unique_id: str  # the disk's GUID: stable across renames, used as the inventory disk's uuid
    size_bytes: int
    os_type: OsType | None
    source_uri: str = ""  # the page blob it was imported from, if any
    managed_by: str = ""  # id of the VM it is attached to
    state: str = ""  # ARM's diskState: Unattached, Attached, ActiveSAS (being read through a SAS), ...


@dataclass(frozen=True)
class ArmNic:
    id: str
    name: str
    mac: str
    private_ip: str
    ip_mode: IpMode
    subnet_id: str


@dataclass(frozen=True)
class ArmVm:
    id: str
    name: str
    vm_id: str  # the VM's GUID (its SMBIOS UUID)
    size: str
    os_type: OsType
    power_state: PowerState
    os_disk_id: str
    data_disk_ids: tuple[str, ...] = ()  # in LUN order
    nic_ids: tuple[str, ...] = ()
    tags: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class ArmSnapshot:
    id: str
    name: str
    disk_id: str
    state: str = ""  # ARM's diskState (ActiveSAS while read access is granted)


@dataclass(frozen=True)
class VmSize:
    name: str
    cores: int
    memory_mb: int
    max_data_disks: int


@dataclass(frozen=True)
class Usage:
    """One quota of the subscription in the region (e.g. `cores`, `standardDSv3Family`)."""

    name: str
    current: int
    limit: int


@dataclass(frozen=True)
class ArmConnection:
    """A virtual network gateway connection of the resource group (site-to-site VPN, ExpressRoute)."""

    name: str
    vnet_id: str  # the virtual network whose gateway it belongs to
    status: str  # ARM's connectionStatus: Connected, Connecting, NotConnected, Unknown


@dataclass(frozen=True)
class AzureCapacity:
    """What the region offers and what the subscription has left there (failover checks read it)."""

    location: str
    sizes: tuple[VmSize, ...]  # empty: the subscription cannot deploy VMs there (AZ-REGION)
    usages: tuple[Usage, ...]


@dataclass(frozen=True)
class VmCreate:
    name: str
    size: str
    os_type: OsType
    os_disk_id: str
    data_disk_ids: tuple[str, ...]
    nic_ids: tuple[str, ...]
    tags: Mapping[str, str]


class Arm(Protocol):
    """One resource group of one subscription, in the group's region."""

    subscription: str
    resource_group: str

    def location(self) -> str: ...

    def list_vms(self) -> list[ArmVm]: ...

    def list_disks(self) -> list[ArmDisk]: ...

    def list_nics(self) -> list[ArmNic]: ...

    def import_disk(self, name: str, source_uri: str, size_bytes: int, os_type: OsType | None) -> ArmDisk:
        """A managed disk holding a copy of the page blob at `source_uri`."""
        ...

    def disk_from_snapshot(self, name: str, snapshot_id: str, os_type: OsType | None) -> ArmDisk: ...

    def delete_disk(self, name: str) -> None: ...

    def create_upload_disk(self, name: str, size_bytes: int) -> ArmDisk:
        """An empty managed disk of `size_bytes` (whole MiB) written through `disk_write_url`
        (createOption Upload): the probe of the managed-disk diff's self-test."""
        ...

    def disk_write_url(self, name: str, seconds: int) -> str:
        """A write SAS on an upload disk (grant access Write); `end_disk_read` ends it too."""
        ...

    def disk_read_url(self, name: str, seconds: int) -> str:
        """A read-only SAS URL of the managed disk's content, valid for `seconds` (grant access)."""
        ...

    def end_disk_read(self, name: str) -> None:
        """Revoke the read access `disk_read_url` granted."""
        ...

    def create_nic(self, name: str, subnet_id: str, private_ip: str) -> ArmNic:
        """A NIC on `subnet_id`; static when `private_ip` is given, else dynamic."""
        ...

    def delete_nic(self, name: str) -> None: ...

    def create_vm(self, spec: VmCreate) -> ArmVm: ...

    def set_disks(self, vm: str, os_disk_id: str, data_disk_ids: tuple[str, ...]) -> ArmVm:
        """Swap the OS disk and replace the data disks (the VM must be deallocated)."""
        ...

    def delete_vm(self, name: str) -> None: ...

    def start_vm(self, name: str) -> None: ...

    def deallocate_vm(self, name: str) -> None: ...

    def snapshot_disk(self, name: str, disk_id: str) -> ArmSnapshot:
        """An incremental snapshot of the disk."""
        ...

    def list_snapshots(self) -> list[ArmSnapshot]: ...

    def snapshot_read_url(self, name: str, seconds: int) -> str:
        """A read-only SAS URL of the snapshot's content (grant access), like `disk_read_url`."""
        ...

    def end_snapshot_read(self, name: str) -> None: ...

    def delete_snapshot(self, name: str) -> None: ...

    def vm_sizes(self) -> list[VmSize]:
        """The VM sizes the fabric's location offers the subscription; empty where ARM refuses the
        location (unknown, or not enabled for the subscription)."""
        ...

    def usages(self) -> list[Usage]: ...

    def gateway_connections(self) -> list[ArmConnection]:
        """The resource group's virtual network gateway connections, with their state."""
        ...
