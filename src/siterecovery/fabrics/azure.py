"""The Azure fabric: a resource group of one subscription as a cloud recovery site.

Discovery maps the group's VMs, managed disks and NICs into the provider-neutral `Inventory`
(a disk's `uuid` is the managed disk's GUID, its `backing` the disk's ARM id, which is what
attaching takes). A failover's `create_machine` gets disks whose backing is the master
target's target path of the replica (`page_blob.blob_name` names its page blob the same way): each becomes a
managed disk imported from its blob (the first is the OS disk), then NICs on the recovery subnet
and the VM, tagged as created by a failover (RP-ELIGIBLE reads the tag back as `CloudOrigin`).

Before the VM is created (ARM starts a VM it creates) each imported disk gets an incremental
snapshot, `<vm>-failover-base-<position>`: reverting to it returns the VM to the failover's point,
and failback (`failback_changes`) sends only the ranges changed since, read over SAS.

Azure VMs have no snapshot chain: a fabric snapshot is one incremental snapshot per disk, named
`<snapshot>-<position>` (`os`, `lun0`, …) so it survives the disk swaps a revert makes; a revert
creates new disks from them and swaps them onto the deallocated VM. Every ARM call goes through
the `Arm` interface (azure_arm.py).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

from azure.storage.blob import BlobClient, ContainerClient

from siterecovery.dataplane.changed_ranges import ChangedRange, ContentCompare
from siterecovery.dataplane.page_blob import STORAGE_API_VERSION, blob_name
from siterecovery.fabrics.azure_arm import ORIGIN_TAG, Arm, ArmDisk, ArmNic, ArmVm, AzureCapacity, VmCreate
from siterecovery.fabrics.azure_diff import DiffChoice
from siterecovery.fabrics.azure_diff import choose as choose_diff
from siterecovery.fabrics.base import (
    CloudOrigin,
    Disk,
    FabricError,
    Inventory,
    IpMode,
    Machine,
    MachineSpec,
    Nic,
    PowerState,
    ResourceGroup,
    SiteKind,
    Snapshot,
)

DEFAULT_VM_SIZE = "Standard_D2s_v3"
# The snapshot a failover takes of the recovery VM's disks before it first boots: failback sends
# what changed since, and reverting to it returns the VM to the failover's point.
FAILOVER_BASE = "failover-base"
READ_SECONDS = 4 * 3600  # how long a failback's read access to a disk or snapshot lasts
DEFAULT_REPLICA_CONTAINER = "siterecovery-replicas"  # where the cloud master target writes page blobs


@dataclass(frozen=True)
class DiskChanges:
    """One recovery-VM disk's changes since the failover: what failback sends, and where from."""

    label: str
    size_bytes: int
    source: BlobClient  # the disk's content, readable for the failback's duration
    changes: list[ChangedRange]


class AzureFabric:
    def __init__(
        self,
        name: str,
        site: str,
        arm: Arm,
        replicas: ContainerClient,
        *,
        subnet_id: str,
        vm_size: str = DEFAULT_VM_SIZE,
        read_seconds: int = READ_SECONDS,
    ) -> None:
        self.name = name
        self.site = site
        self.arm = arm
        self.replicas = replicas
        self.subnet_id = subnet_id
        self.vm_size = vm_size
        self.read_seconds = read_seconds  # the SAS duration failback asks ARM for (AZ-SAS)

    def diff_choice(self) -> tuple[DiffChoice, bool]:
        """How failback finds changed ranges here (the self-test at first use); True when just made."""
        return choose_diff(self.arm, self.name)

    # ---- discovery --------------------------------------------------------------------------

    def discover(self) -> Inventory:
        disks = {d.id.lower(): d for d in self.arm.list_disks()}
        nics = {n.id.lower(): n for n in self.arm.list_nics()}
        machines = tuple(self._machine(vm, disks, nics) for vm in self.arm.list_vms())
        return Inventory(
            site=self.site,
            kind=SiteKind.CLOUD,
            discovered_at=time.time(),
            machines=machines,
            resource_groups=(ResourceGroup(self.arm.resource_group, self.arm.location()),),
        )

    def _machine(self, vm: ArmVm, disks: dict[str, ArmDisk], nics: dict[str, ArmNic]) -> Machine:
        found = [disks.get(i.lower()) for i in (vm.os_disk_id, *vm.data_disk_ids)]
        origin = vm.tags.get(ORIGIN_TAG, "")
        return Machine(
            id=vm.id,
            name=vm.name,
            bios_uuid=vm.vm_id,
            os_type=vm.os_type,
            os_version="",
            power_state=vm.power_state,
            disks=tuple(
                Disk(
                    uuid=d.unique_id, label=d.name, size_bytes=d.size_bytes, backing=d.id, controller_key=lun
                )
                for lun, d in enumerate(found)
                if d is not None
            ),
            nics=tuple(
                Nic(n.name, n.mac, n.ip_mode, n.private_ip, network=n.subnet_id)
                for n in (nics.get(i.lower()) for i in vm.nic_ids)
                if n is not None
            ),
            resource_group=self.arm.resource_group,
            # Only what a failover created may be reprotected; anything untagged counts as manual.
            origin=CloudOrigin(origin) if origin in {o.value for o in CloudOrigin} else CloudOrigin.MANUAL,
        )

    def _vm(self, machine: str) -> ArmVm:
        for vm in self.arm.list_vms():
            if machine in (vm.id, vm.name):
                return vm
        raise FabricError(
            "machine-not-found",
            f"Resource group {self.arm.resource_group} has no VM {machine!r}.",
            "Discover the fabric again and use a VM it lists.",
        )

    def _as_machine(self, vm: ArmVm) -> Machine:
        disks = {d.id.lower(): d for d in self.arm.list_disks()}
        nics = {n.id.lower(): n for n in self.arm.list_nics()}
        return self._machine(vm, disks, nics)

    def capacity(self) -> AzureCapacity:
        """The region, the VM sizes it offers and the subscription's usage there (failover checks)."""
        return AzureCapacity(self.arm.location(), tuple(self.arm.vm_sizes()), tuple(self.arm.usages()))

    # ---- power ------------------------------------------------------------------------------

    def power_on(self, machine: str) -> None:
        self.arm.start_vm(self._vm(machine).name)

    def power_off(self, machine: str) -> None:
        # Deallocated, not just stopped: a stopped VM still bills its cores and keeps its disks leased.
        self.arm.deallocate_vm(self._vm(machine).name)

    def _require_off(self, vm: ArmVm, doing: str) -> None:
        if vm.power_state is PowerState.ON:
            raise FabricError(
                "machine-powered-on",
                f"VM {vm.name} is running.",
                f"Power {vm.name} off (deallocate it) before {doing}.",
            )

    # ---- machines ---------------------------------------------------------------------------

    def create_machine(self, spec: MachineSpec) -> Machine:
        """A failover's VM: managed disks imported from the replica page blobs, NICs, the VM."""
        if not spec.disks:
            raise FabricError(
                "azure-disks-missing", f"Machine {spec.name} has no disks.", "Give the replica disks."
            )
        made: list[ArmDisk] = []
        for i, d in enumerate(spec.disks):
            if not d.backing:
                raise FabricError(
                    "azure-disk-source-missing",
                    f"Disk {d.label} of {spec.name} names no replica page blob.",
                    "Fail over from a pair whose master target writes page blobs (--page-blob-container).",
                )
            blob = self.replicas.get_blob_client(blob_name(d.backing))
            position = self._positions_of(i + 1)[i]
            made.append(
                self.arm.import_disk(
                    f"{spec.name}-{position}", blob.url, d.size_bytes, spec.os_type if i == 0 else None
                )
            )
        for position, disk in zip(self._positions_of(len(made)), made, strict=True):
            self.arm.snapshot_disk(f"{spec.name}-{FAILOVER_BASE}-{position}", disk.id)
        nics = [
            self.arm.create_nic(
                f"{spec.name}-nic{j}",
                nic.network or self.subnet_id,
                nic.address if nic.ip_mode is IpMode.STATIC else "",
            )
            for j, nic in enumerate(spec.nics or (Nic("nic0", "", IpMode.DHCP),))
        ]
        vm = self.arm.create_vm(
            VmCreate(
                name=spec.name,
                size=self.vm_size,
                os_type=spec.os_type,
                os_disk_id=made[0].id,
                data_disk_ids=tuple(d.id for d in made[1:]),
                nic_ids=tuple(n.id for n in nics),
                tags={ORIGIN_TAG: CloudOrigin.FAILOVER.value},
            )
        )
        return self._as_machine(vm)

    def delete_machine(self, machine: str) -> None:
        """The VM, its NICs and its managed disks (like vSphere's delete from disk)."""
        vm = self._vm(machine)
        self._require_off(vm, "deleting it")
        disks = {d.id.lower(): d.name for d in self.arm.list_disks()}
        nics = {n.id.lower(): n.name for n in self.arm.list_nics()}
        self.arm.delete_vm(vm.name)
        for nic_id in vm.nic_ids:
            if nic_id.lower() in nics:
                self.arm.delete_nic(nics[nic_id.lower()])
        for disk_id in (vm.os_disk_id, *vm.data_disk_ids):
            if disk_id.lower() in disks:
                self.arm.delete_disk(disks[disk_id.lower()])
        for snap in self.arm.list_snapshots():
            if snap.name.startswith(f"{vm.name}-{FAILOVER_BASE}-"):
                self.arm.delete_snapshot(snap.name)

    def attach_disks(self, machine: str, disks: Sequence[Disk]) -> None:
        vm = self._vm(machine)
        known = {d.id.lower() for d in self.arm.list_disks()}
        for d in disks:
            if d.backing.lower() not in known:
                raise FabricError(
                    "disk-not-found",
                    f"Resource group {self.arm.resource_group} has no managed disk {d.backing!r}.",
                    "Attach managed disks of the fabric's resource group (their ARM ids).",
                )
        self.arm.set_disks(vm.name, vm.os_disk_id, (*vm.data_disk_ids, *(d.backing for d in disks)))

    def detach_disks(self, machine: str, disk_uuids: Sequence[str]) -> tuple[Disk, ...]:
        vm = self._vm(machine)
        current = self._as_machine(vm)
        gone = tuple(d for d in current.disks[1:] if d.uuid in disk_uuids)
        keep = tuple(d.backing for d in current.disks[1:] if d.uuid not in disk_uuids)
        self.arm.set_disks(vm.name, vm.os_disk_id, keep)
        return gone

    def consolidate_snapshots(self, machine: str) -> int:
        # Azure disk snapshots are separate resources, not a chain under the disk: nothing to merge.
        self._vm(machine)
        return 0

    # ---- snapshots ----------------------------------------------------------------------------

    @staticmethod
    def _positions_of(count: int) -> list[str]:
        return ["os", *(f"lun{i}" for i in range(count - 1))]

    @classmethod
    def _positions(cls, vm: ArmVm) -> list[tuple[str, str]]:
        disks = [vm.os_disk_id, *vm.data_disk_ids]
        return list(zip(cls._positions_of(len(disks)), disks, strict=True))

    def create_snapshot(self, machine: str, name: str) -> Snapshot:
        vm = self._vm(machine)
        sid = f"{vm.name}-{name}"
        for position, disk_id in self._positions(vm):
            self.arm.snapshot_disk(f"{sid}-{position}", disk_id)
        return Snapshot(id=sid, name=name)

    def revert_to_snapshot(self, machine: str, snapshot_id: str) -> None:
        vm = self._vm(machine)
        self._require_off(vm, "reverting it to a snapshot")
        snaps = {s.name: s for s in self.arm.list_snapshots()}
        old = {d.id.lower(): d.name for d in self.arm.list_disks()}
        new: list[str] = []
        suffix = uuid.uuid4().hex[:6]
        for position, _ in self._positions(vm):
            snap = snaps.get(f"{snapshot_id}-{position}")
            if snap is None:
                raise FabricError(
                    "snapshot-not-found",
                    f"VM {vm.name} has no snapshot {snapshot_id!r} of its {position} disk.",
                    "Use a snapshot the fabric lists for this VM.",
                )
            os_type = vm.os_type if position == "os" else None
            new.append(self.arm.disk_from_snapshot(f"{vm.name}-{position}-{suffix}", snap.id, os_type).id)
        self.arm.set_disks(vm.name, new[0], tuple(new[1:]))
        for _, disk_id in self._positions(vm):
            if disk_id.lower() in old:
                self.arm.delete_disk(old[disk_id.lower()])

    def remove_snapshot(self, machine: str, snapshot_id: str) -> None:
        self._vm(machine)
        for snap in self.arm.list_snapshots():
            if snap.name.startswith(f"{snapshot_id}-"):
                self.arm.delete_snapshot(snap.name)

    # ---- failback ------------------------------------------------------------------------------

    @contextmanager
    def failback_changes(self, machine: str) -> Iterator[list[DiskChanges]]:
        """Each disk's ranges changed since the failover's base snapshot, with read access to them.

        Read access (SAS) to the disks and the base snapshots is granted for the `with` block and
        revoked after it. The ranges come from the content compare: the service's managed-disk
        diff is not used until a self-test can vouch for it (see dataplane/changed_ranges.py).
        """
        vm = self._vm(machine)
        current = self._as_machine(vm)
        granted: list[tuple[str, bool]] = []
        try:
            out: list[DiskChanges] = []
            for (position, _), disk in zip(self._positions(vm), current.disks, strict=True):
                snap = f"{vm.name}-{FAILOVER_BASE}-{position}"
                base = BlobClient.from_blob_url(
                    self.arm.snapshot_read_url(snap, self.read_seconds), api_version=STORAGE_API_VERSION
                )
                granted.append((snap, True))
                source = BlobClient.from_blob_url(
                    self.arm.disk_read_url(disk.label, self.read_seconds), api_version=STORAGE_API_VERSION
                )
                granted.append((disk.label, False))
                changes = ContentCompare().compare(source, base, disk.size_bytes)
                out.append(DiskChanges(disk.label, disk.size_bytes, source, changes))
            yield out
        finally:
            for name, is_snapshot in granted:
                if is_snapshot:
                    self.arm.end_snapshot_read(name)
                else:
                    self.arm.end_disk_read(name)

    def active_reads(self, machine: str) -> list[str]:
        """The VM's disks and its snapshots already being read through a SAS (ARM's ActiveSAS)."""
        vm = self._vm(machine)
        disks = [d.name for d in self.arm.list_disks() if d.managed_by == vm.id and d.state == "ActiveSAS"]
        snaps = [
            s.name
            for s in self.arm.list_snapshots()
            if s.name.startswith(f"{vm.name}-") and s.state == "ActiveSAS"
        ]
        return sorted(disks + snaps)

    def move_storage(self, machine: str, datastore: str) -> None:
        raise FabricError(
            "azure-no-datastores",
            f"VM {machine} uses managed disks, which live in no datastore to move to.",
            "Storage moves apply to vSphere sites; on Azure change the disks' SKU instead.",
        )
