"""The vSphere provider: a vCenter site discovered and driven through pyVmomi.

`VSphereFabric` implements `Fabric` for a real vCenter (tested against govmomi's vcsim). Discovery
is in `vsphere_discovery`; every operation here is a vCenter task awaited with progress, and every
vCenter fault becomes a `FabricError` with a stable code (`vsphere_session`). Operations are safe to
replay: powering on a running machine or attaching an attached disk does nothing. Snapshots are the
exception, as in vSphere: each create makes a new one, and a removed one is `snapshot-not-found`.
"""

from __future__ import annotations

import posixpath
from collections.abc import Sequence
from typing import Any

from pyVmomi import vim as _vim

from siterecovery.fabrics.base import Disk, FabricError, Inventory, Machine, MachineSpec, OsType, Snapshot
from siterecovery.fabrics.vsphere_devices import Spec, TempKeys, disk_device, slots
from siterecovery.fabrics.vsphere_discovery import (
    VM_PROPS,
    Found,
    collect,
    datastore_of,
    discover,
    retrieve,
    snapshot_nodes,
    snapshots,
    to_disk,
    to_machine,
)
from siterecovery.fabrics.vsphere_session import Progress, connect, disconnect, fabric_error, wait_task

# pyVmomi's stubs leave its data-object constructors untyped; its types are dynamic: use them as Any.
vim: Any = _vim

# A machine created for alternate-location recovery gets a neutral guest type and size; the
# replicated disks carry the operating system.
_GUEST_IDS = {OsType.LINUX: "otherLinux64Guest", OsType.WINDOWS: "windows9Server64Guest"}
_NEW_VM_CPUS = 2
_NEW_VM_MEMORY_MB = 4096


class VSphereFabric:
    """One vCenter (optionally one of its datacenters) as a site."""

    def __init__(
        self,
        host: str,
        port: int,
        user: str,
        password: str,
        insecure: bool = False,
        datacenter: str | None = None,
        *,
        name: str | None = None,
        progress: Progress | None = None,
        task_timeout: float = 600.0,
    ) -> None:
        self.name = name or host
        self.host, self.port, self.user = host, port, user
        self._password = password
        self.insecure = insecure
        self.datacenter = datacenter
        self.progress = progress
        self.task_timeout = task_timeout
        self._si: Any = None

    # ---- connection --------------------------------------------------------------------------

    @property
    def service_instance(self) -> Any:
        if self._si is None:
            self._si = connect(self.host, self.port, self.user, self._password, self.insecure)
        return self._si

    def close(self) -> None:
        if self._si is not None:
            disconnect(self._si)
            self._si = None

    def __enter__(self) -> VSphereFabric:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def _root(self) -> Any:
        content = self.service_instance.content
        if self.datacenter is None:
            return content.rootFolder
        for dc in content.rootFolder.childEntity:
            if isinstance(dc, vim.Datacenter) and dc.name == self.datacenter:
                return dc
        raise FabricError(
            "datacenter-not-found",
            f"vCenter {self.host} has no datacenter {self.datacenter!r}.",
            "Give the name of an existing datacenter, or none for the whole vCenter.",
        )

    def _call(self, doing: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """Run one vCenter call (a task is awaited) with its faults as `FabricError`s."""
        try:
            result = fn(*args, **kwargs)
            if isinstance(result, vim.Task):
                return wait_task(result, doing, self.progress, self.task_timeout)
            return result
        except FabricError:
            raise
        except Exception as exc:
            raise fabric_error(exc, doing, f"{self.host}:{self.port}") from exc

    # ---- discovery ---------------------------------------------------------------------------

    def discover(self) -> Inventory:
        inventory: Inventory = self._call(
            f"discover vCenter {self.host}", lambda: discover(self.service_instance, self.name, self._root())
        )
        return inventory

    def _find(self, kind: Any, ident: str, what: str) -> Any:
        def lookup() -> Any:
            for found in collect(self.service_instance, self._root(), {kind: ["name"]}):
                if ident in (found.ref._moId, found.props.get("name")):
                    return found.ref
            return None

        ref = self._call(f"look up {what} {ident}", lookup)
        if ref is None:
            raise FabricError(
                f"{what}-not-found",
                f"Site {self.name} has no {what} {ident!r}.",
                f"Rediscover the site and use a listed {what}.",
            )
        return ref

    def _vm(self, ident: str) -> Any:
        return self._find(vim.VirtualMachine, ident, "machine")

    def _read(self, obj: Any, *paths: str) -> dict[str, Any]:
        """Some properties of one object in one call; an unset property is absent (vcsim's
        single-property Fetch fails on unset ones, and one call per property is slower anyway)."""

        def fetch() -> dict[str, Any]:
            spec = vim.PropertyCollector.FilterSpec(
                objectSet=[vim.PropertyCollector.ObjectSpec(obj=obj)],
                propSet=[vim.PropertyCollector.PropertySpec(type=type(obj), pathSet=list(paths))],
            )
            return dict(next(retrieve(self.service_instance, spec)).props)

        result: dict[str, Any] = self._call(f"read {', '.join(paths)} of {obj._moId}", fetch)
        return result

    def _machine(self, vm: Any) -> Machine:
        def fetch() -> Machine:
            spec = vim.PropertyCollector.FilterSpec(
                objectSet=[vim.PropertyCollector.ObjectSpec(obj=vm)],
                propSet=[vim.PropertyCollector.PropertySpec(type=vim.VirtualMachine, pathSet=VM_PROPS)],
            )
            found: Found = next(retrieve(self.service_instance, spec))
            host = found.props.get("runtime.host")
            names = {host._moId: host.name} if host is not None else {}
            return to_machine(found, names)

        return self._call(f"read machine {vm._moId}", fetch)  # type: ignore[no-any-return]

    # ---- power -------------------------------------------------------------------------------

    def power_on(self, machine: str) -> None:
        vm = self._vm(machine)
        if self._call(f"read power state of {machine}", lambda: vm.runtime.powerState) != "poweredOn":
            self._call(f"power on {machine}", vm.PowerOnVM_Task)

    def power_off(self, machine: str) -> None:
        vm = self._vm(machine)
        if self._call(f"read power state of {machine}", lambda: vm.runtime.powerState) != "poweredOff":
            self._call(f"power off {machine}", vm.PowerOffVM_Task)

    # ---- create and delete -------------------------------------------------------------------

    def create_machine(self, spec: MachineSpec) -> Machine:
        if self._machine_exists(spec.name):
            raise FabricError(
                "machine-exists",
                f"Site {self.name} already has a machine named {spec.name}.",
                "Choose another name or delete the existing machine first.",
            )
        host = self._find(vim.HostSystem, spec.host, "host")
        datastore = self._find(vim.Datastore, spec.datastore, "datastore")
        self._require_writable(datastore, host, spec.datastore, spec.host)
        keys = TempKeys()
        changes: list[Any] = []
        free = slots([], keys, changes, spec.name)  # a new machine: LSI Logic controllers only
        for disk in spec.disks:
            controller, unit = next(free)
            device = disk_device(
                keys(),
                controller,
                unit,
                disk.size_bytes,
                disk.backing or f"[{spec.datastore}] {spec.name}/{spec.name}_{disk.label}.vmdk",
            )
            change = Spec(operation=Spec.Operation.add, device=device)
            if not disk.backing:
                change.fileOperation = Spec.FileOperation.create
            changes.append(change)
        networks = self._call(f"read networks of host {spec.host}", lambda: [n.name for n in host.network])
        for nic in spec.nics:
            card = vim.vm.device.VirtualVmxnet3(
                key=keys(),
                backing=vim.vm.device.VirtualEthernetCard.NetworkBackingInfo(
                    deviceName=_network(nic.network, networks, spec.host)
                ),
                addressType="manual" if nic.mac else "generated",
                macAddress=nic.mac or None,
            )
            changes.append(Spec(operation=Spec.Operation.add, device=card))
        config = vim.vm.ConfigSpec(
            name=spec.name,
            guestId=_GUEST_IDS[spec.os_type],
            numCPUs=_NEW_VM_CPUS,
            memoryMB=_NEW_VM_MEMORY_MB,
            files=vim.vm.FileInfo(vmPathName=f"[{spec.datastore}]"),
            deviceChange=changes,
            extraConfig=[vim.option.OptionValue(key="disk.EnableUUID", value="TRUE")],
        )
        folder, pool = self._call(f"find placement on host {spec.host}", _placement, host)
        vm = self._call(
            f"create machine {spec.name} on {spec.host} in {spec.datastore}",
            folder.CreateVM_Task,
            config=config,
            pool=pool,
            host=host,
        )
        return self._machine(vm)

    def delete_machine(self, machine: str) -> None:
        vm = self._vm(machine)
        m = self._machine(vm)
        if m.power_state.value == "on":
            raise FabricError(
                "machine-powered-on",
                f"Machine {m.name} is powered on.",
                f"Power {m.name} off before deleting it.",
            )
        # Destroying a VM deletes every disk attached to it; disks it only borrows (another
        # machine's, attached to a master target) are detached first so they survive.
        own = self._call(f"read folder of {m.name}", lambda: _folder(vm.config.files.vmPathName))
        borrowed = [d.uuid for d in m.disks if posixpath.dirname(d.backing) != own]
        if borrowed:
            self.detach_disks(vm._moId, borrowed)
        self._call(f"delete machine {m.name}", vm.Destroy_Task)

    # ---- disks -------------------------------------------------------------------------------

    def attach_disks(self, machine: str, disks: Sequence[Disk]) -> None:
        vm = self._vm(machine)
        devices = self._call(f"read devices of {machine}", lambda: list(vm.config.hardware.device))
        present = {
            (getattr(d.backing, "uuid", None), getattr(d.backing, "fileName", None))
            for d in devices
            if isinstance(d, vim.vm.device.VirtualDisk)
        }
        uuids = {u for u, _ in present}
        files = {f for _, f in present}
        wanted = [d for d in disks if d.uuid not in uuids and d.backing not in files]
        if not wanted:
            return  # attaching is idempotent so a replayed workflow step is harmless
        keys = TempKeys()
        changes: list[Any] = []
        free = slots(devices, keys, changes, machine)
        for disk in wanted:
            controller, unit = next(free)
            device = disk_device(keys(), controller, unit, disk.size_bytes, disk.backing)
            changes.append(Spec(operation=Spec.Operation.add, device=device))
        labels = ", ".join(d.backing for d in wanted)
        self._call(
            f"attach {labels} to {machine}", vm.ReconfigVM_Task, spec=vim.vm.ConfigSpec(deviceChange=changes)
        )

    def detach_disks(self, machine: str, disk_uuids: Sequence[str]) -> tuple[Disk, ...]:
        vm = self._vm(machine)
        devices, vmx = self._call(
            f"read devices of {machine}",
            lambda: (list(vm.config.hardware.device), vm.config.files.vmPathName),
        )
        by_uuid = {d.backing.uuid: d for d in devices if isinstance(d, vim.vm.device.VirtualDisk)}
        unknown = [u for u in disk_uuids if u not in by_uuid]
        if unknown:
            raise FabricError(
                "disk-not-attached",
                f"Machine {machine} has no disk with UUID {', '.join(unknown)}.",
                f"Rediscover the site and detach only disks attached to {machine}.",
            )
        # Reprotect attaches disks that live in the protected machine's folder; one found in the
        # master target's own folder was carried there by Storage vMotion / Storage DRS (RP-MT-MOVE).
        moved = [
            to_disk(by_uuid[u])
            for u in disk_uuids
            if posixpath.dirname(by_uuid[u].backing.fileName) == _folder(vmx)
        ]
        if moved:
            raise _disks_moved(machine, moved)
        changes = [Spec(operation=Spec.Operation.remove, device=by_uuid[u]) for u in disk_uuids]
        self._call(
            f"detach disks {', '.join(disk_uuids)} from {machine}",
            vm.ReconfigVM_Task,
            spec=vim.vm.ConfigSpec(deviceChange=changes),
        )
        return tuple(to_disk(by_uuid[u]) for u in disk_uuids)

    def consolidate_snapshots(self, machine: str) -> int:
        vm = self._vm(machine)
        tree = self._read(vm, "snapshot").get("snapshot")
        count = len(snapshots(tree.rootSnapshotList if tree is not None else None))
        if count:
            self._call(f"remove all snapshots of {machine}", vm.RemoveAllSnapshots_Task, consolidate=True)
        if self._call(f"read consolidation state of {machine}", lambda: vm.runtime.consolidationNeeded):
            self._call(f"consolidate disks of {machine}", vm.ConsolidateVMDisks_Task)
        return count

    def create_snapshot(self, machine: str, name: str) -> Snapshot:
        vm = self._vm(machine)
        # Disks only: the snapshot is taken of a machine that has not booted, so there is no
        # memory to keep and no guest to quiesce.
        ref = self._call(
            f"snapshot {machine} as {name}", vm.CreateSnapshot_Task, name=name, memory=False, quiesce=False
        )
        return Snapshot(id=ref._moId, name=name)

    def revert_to_snapshot(self, machine: str, snapshot_id: str) -> None:
        snapshot = self._snapshot(machine, snapshot_id)
        self._call(f"revert {machine} to snapshot {snapshot_id}", snapshot.RevertToSnapshot_Task)

    def remove_snapshot(self, machine: str, snapshot_id: str) -> None:
        snapshot = self._snapshot(machine, snapshot_id)
        # Its children stay (they are other points), and its delta merges into the disks now.
        self._call(
            f"remove snapshot {snapshot_id} of {machine}",
            snapshot.RemoveSnapshot_Task,
            removeChildren=False,
            consolidate=True,
        )

    def move_storage(self, machine: str, datastore: str) -> None:
        vm = self._vm(machine)
        target = self._find(vim.Datastore, datastore, "datastore")
        host = self._call(f"read host of {machine}", lambda: vm.runtime.host)
        self._require_writable(target, host, datastore, host.name)
        self._call(
            f"move storage of {machine} to {datastore}",
            vm.RelocateVM_Task,
            spec=vim.vm.RelocateSpec(datastore=target),
        )

    # ---- helpers -----------------------------------------------------------------------------

    def _machine_exists(self, name: str) -> bool:
        try:
            self._vm(name)
        except FabricError as err:
            if err.code == "machine-not-found":
                return False
            raise
        return True

    def _snapshot(self, machine: str, snapshot_id: str) -> Any:
        """The snapshot of `machine` whose moId is `snapshot_id`, wherever it is in the tree."""
        tree = self._read(self._vm(machine), "snapshot").get("snapshot")
        for node in snapshot_nodes(tree.rootSnapshotList if tree is not None else None):
            if node.snapshot._moId == snapshot_id:
                return node.snapshot
        raise FabricError(
            "snapshot-not-found",
            f"Machine {machine} has no snapshot {snapshot_id!r}.",
            f"Rediscover the machine's snapshots and use an id listed for {machine}.",
        )

    def _require_writable(self, datastore: Any, host: Any, ds_name: str, host_name: str) -> None:
        mounts = self._call(f"read mounts of {ds_name}", lambda: list(datastore.host))
        if not any(m.key == host and m.mountInfo.accessMode == "readWrite" for m in mounts):
            raise FabricError(
                "datastore-not-writable",
                f"Datastore {ds_name} is not mounted read/write on host {host_name}.",
                f"Mount {ds_name} read/write on {host_name} or choose another datastore.",
            )


def _network(wanted: str, available: list[str], host: str) -> str:
    """The port group a new NIC joins: the one named, else the host's first (where its VMs are)."""
    if wanted in available or (not wanted and available):
        return wanted or available[0]
    raise FabricError(
        "network-not-found",
        f"Host {host} has no network {wanted!r}" if wanted else f"Host {host} has no network at all",
        f"Choose one of the host's networks ({', '.join(available) or 'none'}), or add one to {host}.",
    )


def _placement(host: Any) -> tuple[Any, Any]:
    """The VM folder of the host's datacenter and the root resource pool of its cluster."""
    parent = host.parent
    pool = parent.resourcePool
    while not isinstance(parent, vim.Datacenter):
        parent = parent.parent
    return parent.vmFolder, pool


def _folder(file_name: str) -> str:
    return posixpath.dirname(file_name) if "/" in file_name else f"[{datastore_of(file_name)}]"


def _disks_moved(machine: str, moved: Sequence[Disk]) -> FabricError:
    where = "; ".join(f"{d.label} {d.uuid} now at {d.backing}" for d in moved)
    return FabricError(
        "mt-disks-moved",
        f"Disks attached to master target {machine} were moved by storage migration and cannot be "
        f"detached: {where}.",
        f"Recover by hand: find the disks at the paths above, detach them from {machine}, attach them to the "
        "protected machine, and power it on; then exclude the master target from Storage vMotion/DRS.",
    )
