"""FakeArm: a fake of Azure Resource Manager for the Azure fabric's tests (no ARM emulator runs here).

It implements the `Arm` interface with resources kept in memory, and with managed disks and disk
snapshots as real page blobs in Azurite (container `disks`), so every byte a failover moves is
real storage traffic: importing a disk reads the replica VHD's pages and writes them into the
disk's blob, creating a disk from a snapshot copies the snapshot's blob, and a disk's read URL is a
real SAS on its blob. It enforces the ARM rules the fabric depends on: an imported blob must be a
fixed VHD, a disk attached to a VM cannot be deleted or attached to a second VM, disks are swapped
only on a deallocated VM, a new VM starts running. VM sizes and quotas are a fixed catalogue.
"""

from __future__ import annotations

import dataclasses
import datetime
import uuid

from azure.storage.blob import BlobClient, BlobSasPermissions, ContainerClient, generate_blob_sas

from siterecovery.dataplane.page_blob import MAX_PUT, PAGE, PageBlobWriter
from siterecovery.fabrics.azure_arm import (
    ArmConnection,
    ArmDisk,
    ArmNic,
    ArmSnapshot,
    ArmVm,
    Usage,
    VmCreate,
    VmSize,
)
from siterecovery.fabrics.base import FabricError, IpMode, OsType, PowerState
from tests.azure.conftest import ACCOUNT, ACCOUNT_KEY

REGIONS = ("westeurope", "northeurope")  # where the fake's subscription can create VMs
SIZES = (
    VmSize("Standard_B1s", 1, 1024, 2),
    VmSize("Standard_D2s_v3", 2, 8192, 4),
    VmSize("Standard_D4s_v3", 4, 16384, 8),
)


def _refuse(message: str) -> FabricError:
    return FabricError("azure-arm-failed", f"(fake ARM) {message}", "")


class FakeArm:
    def __init__(
        self,
        disks: ContainerClient,
        *,
        resource_group: str = "rg-recovery",
        location: str = "westeurope",
        core_quota: int = 10,
    ) -> None:
        self.subscription = "00000000-0000-0000-0000-000000000000"
        self.resource_group = resource_group
        self._location = location
        self.core_quota = core_quota
        self.blobs = disks
        self.vms: dict[str, ArmVm] = {}
        self.disks: dict[str, ArmDisk] = {}
        self.nics: dict[str, ArmNic] = {}
        self.snapshots: dict[str, ArmSnapshot] = {}
        self.read_grants: set[str] = set()
        self.write_grants: set[str] = set()  # upload disks being written (ActiveUpload)
        # Site-to-site connections of the group's virtual network gateways (AZ-VPN); a test sets them.
        self.connections: list[ArmConnection] = []
        self._next_ip = 4

    def _id(self, provider: str, kind: str, name: str) -> str:
        group = f"/subscriptions/{self.subscription}/resourceGroups/{self.resource_group}"
        return f"{group}/providers/{provider}/{kind}/{name}"

    def location(self) -> str:
        return self._location

    def list_vms(self) -> list[ArmVm]:
        return list(self.vms.values())

    def list_disks(self) -> list[ArmDisk]:
        return [
            dataclasses.replace(d, state=self._state(d.name, bool(d.managed_by))) for d in self.disks.values()
        ]

    def _state(self, blob: str, attached: bool) -> str:
        if blob in self.write_grants:
            return "ActiveUpload"
        return "ActiveSAS" if blob in self.read_grants else ("Attached" if attached else "Unattached")

    def list_nics(self) -> list[ArmNic]:
        return list(self.nics.values())

    def list_snapshots(self) -> list[ArmSnapshot]:
        return [
            dataclasses.replace(s, state=self._state(f"snapshot-{s.name}", False))
            for s in self.snapshots.values()
        ]

    # ---- disks ----------------------------------------------------------------------------------

    def _copy(self, source: BlobClient, name: str, size: int) -> None:
        """Copy the first `size` bytes of `source` into blob `name`, only the pages it holds."""
        target = PageBlobWriter(self.blobs.get_blob_client(name), size)
        for page in source.list_page_ranges():
            lo, hi = int(page.start or 0), min(int(page.end or 0) + 1, size)
            for at in range(lo, hi, MAX_PUT):
                n = min(MAX_PUT, hi - at)
                target.write(at, source.download_blob(offset=at, length=n).readall())
        target.flush()

    def _new_disk(self, name: str, size: int, os_type: OsType | None, source_uri: str) -> ArmDisk:
        if name in self.disks:
            raise _refuse(f"disk {name} exists")
        disk = ArmDisk(
            id=self._id("Microsoft.Compute", "disks", name),
            name=name,
            unique_id=str(uuid.uuid4()),
            size_bytes=size,
            os_type=os_type,
            source_uri=source_uri,
        )
        self.disks[name] = disk
        return disk

    def import_disk(self, name: str, source_uri: str, size_bytes: int, os_type: OsType | None) -> ArmDisk:
        source = BlobClient.from_blob_url(
            source_uri,
            credential={"account_name": ACCOUNT, "account_key": ACCOUNT_KEY},
            api_version=self.blobs.api_version,
        )
        blob_size = int(source.get_blob_properties().size)
        footer = source.download_blob(offset=blob_size - PAGE, length=8).readall()
        if footer != b"conectix" or blob_size - PAGE < size_bytes:
            raise _refuse(f"{source_uri} is not a fixed VHD of at least {size_bytes} bytes")
        self._copy(source, name, blob_size - PAGE)
        return self._new_disk(name, blob_size - PAGE, os_type, source_uri)

    def disk_from_snapshot(self, name: str, snapshot_id: str, os_type: OsType | None) -> ArmDisk:
        snap = next((s for s in self.snapshots.values() if s.id == snapshot_id), None)
        if snap is None:
            raise _refuse(f"no snapshot {snapshot_id}")
        source = self.blobs.get_blob_client(f"snapshot-{snap.name}")
        size = int(source.get_blob_properties().size) - PAGE
        self._copy(source, name, size)
        return self._new_disk(name, size, os_type, "")

    def delete_disk(self, name: str) -> None:
        disk = self.disks.get(name)
        if disk is None:
            raise _refuse(f"no disk {name}")
        if disk.managed_by:
            raise _refuse(f"disk {name} is attached to {disk.managed_by}")
        del self.disks[name]
        self.blobs.get_blob_client(name).delete_blob()

    def disk_read_url(self, name: str, seconds: int) -> str:
        if name not in self.disks:
            raise _refuse(f"no disk {name}")
        self.read_grants.add(name)
        return self._sas(name, seconds)

    def _sas(self, blob: str, seconds: int, write: bool = False) -> str:
        sas = generate_blob_sas(
            ACCOUNT,
            self.blobs.container_name,
            blob,
            account_key=ACCOUNT_KEY,
            permission=BlobSasPermissions(read=True, write=write),
            expiry=datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=seconds),
        )
        return f"{self.blobs.get_blob_client(blob).url}?{sas}"

    def end_disk_read(self, name: str) -> None:
        self.read_grants.discard(name)
        self.write_grants.discard(name)

    def create_upload_disk(self, name: str, size_bytes: int) -> ArmDisk:
        self.blobs.get_blob_client(name).create_page_blob(size_bytes)
        return self._new_disk(name, size_bytes, None, "")

    def disk_write_url(self, name: str, seconds: int) -> str:
        if name not in self.disks:
            raise _refuse(f"no disk {name}")
        self.write_grants.add(name)
        return self._sas(name, seconds, write=True)

    def snapshot_read_url(self, name: str, seconds: int) -> str:
        if name not in self.snapshots:
            raise _refuse(f"no snapshot {name}")
        self.read_grants.add(f"snapshot-{name}")
        return self._sas(f"snapshot-{name}", seconds)

    def end_snapshot_read(self, name: str) -> None:
        self.read_grants.discard(f"snapshot-{name}")

    def snapshot_disk(self, name: str, disk_id: str) -> ArmSnapshot:
        disk = next((d for d in self.disks.values() if d.id == disk_id), None)
        if disk is None:
            raise _refuse(f"no disk {disk_id}")
        self._copy(self.blobs.get_blob_client(disk.name), f"snapshot-{name}", disk.size_bytes)
        snap = ArmSnapshot(self._id("Microsoft.Compute", "snapshots", name), name, disk_id)
        self.snapshots[name] = snap
        return snap

    def delete_snapshot(self, name: str) -> None:
        if self.snapshots.pop(name, None) is None:
            raise _refuse(f"no snapshot {name}")
        self.blobs.get_blob_client(f"snapshot-{name}").delete_blob()

    # ---- network --------------------------------------------------------------------------------

    def create_nic(self, name: str, subnet_id: str, private_ip: str) -> ArmNic:
        mode = IpMode.STATIC if private_ip else IpMode.DHCP
        if not private_ip:
            private_ip = f"10.1.0.{self._next_ip}"
            self._next_ip += 1
        nic = ArmNic(
            id=self._id("Microsoft.Network", "networkInterfaces", name),
            name=name,
            mac="00:0d:3a:" + ":".join(f"{b:02x}" for b in uuid.uuid4().bytes[:3]),
            private_ip=private_ip,
            ip_mode=mode,
            subnet_id=subnet_id,
        )
        self.nics[name] = nic
        return nic

    def delete_nic(self, name: str) -> None:
        if any(self.nics[name].id in vm.nic_ids for vm in self.vms.values()):
            raise _refuse(f"NIC {name} is in use")
        del self.nics[name]

    # ---- VMs ------------------------------------------------------------------------------------

    def _attach(self, vm_id: str, disk_ids: tuple[str, ...]) -> None:
        by_id = {d.id: d for d in self.disks.values()}
        for disk_id in disk_ids:
            disk = by_id.get(disk_id)
            if disk is None:
                raise _refuse(f"no disk {disk_id}")
            if disk.managed_by not in ("", vm_id):
                raise _refuse(f"disk {disk.name} is attached to {disk.managed_by}")
        for disk in list(self.disks.values()):
            attached = disk.id in disk_ids
            if attached or disk.managed_by == vm_id:
                self.disks[disk.name] = dataclasses.replace(disk, managed_by=vm_id if attached else "")

    def create_vm(self, spec: VmCreate) -> ArmVm:
        size = next((s for s in SIZES if s.name == spec.size), None)
        if size is None or spec.name in self.vms:
            raise _refuse(f"cannot create VM {spec.name} of size {spec.size}")
        if len(spec.data_disk_ids) > size.max_data_disks:
            raise _refuse(f"size {spec.size} takes at most {size.max_data_disks} data disks")
        vm_id = self._id("Microsoft.Compute", "virtualMachines", spec.name)
        self._attach(vm_id, (spec.os_disk_id, *spec.data_disk_ids))
        vm = ArmVm(
            id=vm_id,
            name=spec.name,
            vm_id=str(uuid.uuid4()),
            size=spec.size,
            os_type=spec.os_type,
            power_state=PowerState.ON,  # ARM starts a VM it creates
            os_disk_id=spec.os_disk_id,
            data_disk_ids=spec.data_disk_ids,
            nic_ids=spec.nic_ids,
            tags=dict(spec.tags),
        )
        self.vms[spec.name] = vm
        return vm

    def _get(self, name: str) -> ArmVm:
        if name not in self.vms:
            raise _refuse(f"no VM {name}")
        return self.vms[name]

    def set_disks(self, vm: str, os_disk_id: str, data_disk_ids: tuple[str, ...]) -> ArmVm:
        current = self._get(vm)
        if current.power_state is PowerState.ON and os_disk_id != current.os_disk_id:
            raise _refuse(f"the OS disk of VM {vm} can be swapped only while it is deallocated")
        self._attach(current.id, (os_disk_id, *data_disk_ids))
        self.vms[vm] = dataclasses.replace(current, os_disk_id=os_disk_id, data_disk_ids=data_disk_ids)
        return self.vms[vm]

    def delete_vm(self, name: str) -> None:
        vm = self._get(name)
        self._attach(vm.id, ())
        del self.vms[name]

    def start_vm(self, name: str) -> None:
        self.vms[name] = dataclasses.replace(self._get(name), power_state=PowerState.ON)

    def deallocate_vm(self, name: str) -> None:
        self.vms[name] = dataclasses.replace(self._get(name), power_state=PowerState.OFF)

    # ---- facts ----------------------------------------------------------------------------------

    def vm_sizes(self) -> list[VmSize]:
        return list(SIZES) if self._location.lower() in REGIONS else []

    def gateway_connections(self) -> list[ArmConnection]:
        return list(self.connections)

    def usages(self) -> list[Usage]:
        cores = {s.name: s.cores for s in SIZES}
        used = sum(cores[vm.size] for vm in self.vms.values() if vm.power_state is PowerState.ON)
        return [Usage("cores", used, self.core_quota)]
