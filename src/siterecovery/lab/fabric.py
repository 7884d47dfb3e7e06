"""The embedded lab provider: a `Fabric` whose site lives in a folder on this machine.

`LabFabric(lab_dir, site)` discovers one of the lab's two sites (`onprem`, vCenter-like, or
`cloud`, Azure-like) from `inventory.json` and performs the operations the DR workflows need on
it. Disks are real image files; powering a machine on starts real processes (its agent's NBD
export and its guest workload, see `siterecovery.lab.runtime`). Whatever `lab set` changed is
what the next discovery sees, which is how every REQUIREMENTS prerequisite is made true or false.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from pathlib import Path

from siterecovery.fabrics import lab_snapshots
from siterecovery.fabrics.base import (
    REQUIRED_PRIVILEGES,
    CloudOrigin,
    Datastore,
    DatastoreMount,
    Disk,
    FabricError,
    Host,
    Inventory,
    Machine,
    MachineSpec,
    Nic,
    PowerState,
    ResourceGroup,
    ScsiController,
    SiteKind,
    Snapshot,
)
from siterecovery.fabrics.lab_build import (
    CONTROLLER_KEY,
    cloud_disk_path,
    make_sparse_image,
    onprem_disk_path,
)
from siterecovery.fabrics.lab_model import (
    AccountMode,
    GuestKind,
    LabController,
    LabDisk,
    LabMachine,
    LabNic,
    LabSite,
    LabState,
)
from siterecovery.fabrics.lab_store import LabStore
from siterecovery.lab import runtime

# The privilege each operation needs (RP-PERMS), so a reduced lab account fails like vCenter does.
_NEEDS: dict[str, tuple[str, ...]] = {
    "power_on": ("VirtualMachine.Interact.PowerOn",),
    "power_off": ("VirtualMachine.Interact.PowerOff",),
    "create_machine": ("VirtualMachine.Inventory.Create", "Datastore.AllocateSpace"),
    "delete_machine": ("VirtualMachine.Inventory.Create",),
    "attach_disks": ("VirtualMachine.Config.AddExistingDisk",),
    "detach_disks": ("VirtualMachine.Config.RemoveDisk",),
    "consolidate_snapshots": ("VirtualMachine.State.RemoveSnapshot",),
    "create_snapshot": ("VirtualMachine.State.CreateSnapshot",),
    "revert_to_snapshot": ("VirtualMachine.State.RevertToSnapshot",),
    "remove_snapshot": ("VirtualMachine.State.RemoveSnapshot",),
    "move_storage": ("Datastore.AllocateSpace",),
}


class LabFabric:
    """One site of a lab folder."""

    def __init__(self, lab_dir: Path, site: str, *, enforce_privileges: bool = True) -> None:
        self.store = LabStore(lab_dir)
        self.lab_dir = self.store.lab_dir
        self.site = site
        self.name = site
        # The lab CLI acts as the hypervisor's own administrator; the product acts through the
        # site's configured account and is held to its privileges.
        self.enforce_privileges = enforce_privileges

    # ---- discovery -------------------------------------------------------------------------

    def discover(self) -> Inventory:
        state = self.store.read()
        site = self._site(state)
        readonly = site.account.mode is AccountMode.READONLY
        privileges = frozenset(site.account.privileges)
        warnings: list[str] = []
        if site.kind is SiteKind.VCENTER:
            missing = [p for p in REQUIRED_PRIVILEGES if p not in privileges]
            if readonly:
                warnings.append(
                    f"The account of site {site.name} is read-only: it lacks {', '.join(missing)}, "
                    "so no datastores are visible; update the vCenter credentials and refresh."
                )
            elif missing:
                warnings.append(f"The account of site {site.name} lacks privileges: {', '.join(missing)}.")
        return Inventory(
            site=site.name,
            kind=site.kind,
            discovered_at=time.time(),
            hosts=tuple(Host(h.id, h.name, h.kind, h.licence, h.version) for h in site.hosts),
            datastores=()
            if readonly
            else tuple(self._datastore(state, site, d.name) for d in site.datastores),
            machines=tuple(self._machine(m) for m in site.machines if m.visible),
            resource_groups=tuple(ResourceGroup(g.name, g.location) for g in site.resource_groups),
            privileges=privileges,
            warnings=tuple(warnings),
        )

    def _datastore(self, state: LabState, site: LabSite, name: str) -> Datastore:
        ds = site.find_datastore(name)
        assert ds is not None
        used = {
            d.backing: d.size_bytes
            for s in state.sites.values()
            for m in s.machines
            for d in m.disks
            if d.datastore == ds.name
        }
        return Datastore(
            id=ds.id,
            name=ds.name,
            type=ds.type,
            accessible=ds.accessible,
            capacity_bytes=ds.capacity_bytes,
            free_bytes=max(0, ds.capacity_bytes - sum(used.values())),
            mounts=tuple(DatastoreMount(m.host, m.read_write) for m in ds.mounts),
        )

    def _machine(self, m: LabMachine) -> Machine:
        return Machine(
            id=m.id,
            name=m.name,
            bios_uuid=m.bios_uuid,
            os_type=m.os_type,
            os_version=m.os_version,
            power_state=m.power_state,
            physical=m.physical,
            host=m.host,
            tools_running=m.tools_running,
            extra_config=dict(m.extra_config),
            snapshots=tuple(Snapshot(s.id, s.name) for s in m.snapshots),
            controllers=tuple(ScsiController(c.key, c.type) for c in m.controllers),
            disks=tuple(self._disk(d) for d in m.disks),
            nics=tuple(
                Nic(n.name, n.mac, n.ip_mode, n.address, n.prefix, n.gateway, n.network) for n in m.nics
            ),
            packages=tuple(m.packages),
            resource_group=m.resource_group,
            origin=m.origin,
            on_lvm=m.on_lvm,
            template=m.template,
            boot_time=m.powered_on_at,
        )

    def _disk(self, d: LabDisk) -> Disk:
        return Disk(
            d.uuid, d.label, d.size_bytes, str(self.lab_dir / d.backing), d.datastore, d.controller_key
        )

    def _stored(self, backing: str) -> str:
        """A backing path as kept in the inventory: relative when inside the lab folder."""
        path = Path(backing)
        path = (self.lab_dir / path) if not path.is_absolute() else path
        try:
            return str(path.resolve().relative_to(self.lab_dir))
        except ValueError:
            return str(path.resolve())

    # ---- lab-only helpers (AG-1) -------------------------------------------------------------

    def powered_on_at(self, machine: str) -> float | None:
        """When `machine` last powered on (None while it is off)."""
        state = self.store.read()
        return self._find(self._site(state), machine).powered_on_at

    @property
    def agent_registration_delay(self) -> float:
        return self._site(self.store.read()).agent_registration_delay

    def agent_registered(self, machine: str, now: float | None = None) -> bool:
        """AG-1: whether the machine's agent has registered again since it powered on."""
        site = self._site(self.store.read())
        started = self._find(site, machine).powered_on_at
        return started is not None and (now or time.time()) - started >= site.agent_registration_delay

    def run_dir(self, machine: str) -> Path:
        return runtime.run_dir(self.lab_dir, self.site, machine)

    # ---- operations ------------------------------------------------------------------------

    def power_on(self, machine: str) -> None:
        with self.store.edit() as state:
            site = self._site(state, "power_on")
            m = self._find(site, machine)
            was_on = m.power_state is PowerState.ON
            if not was_on:
                m.power_state = PowerState.ON
                m.powered_on_at = time.time()
            value = self._machine(m)
            workload, rate, after, owner = m.workload, m.guest_rate, m.guest_after, m.log_owner
            guest, accel = state.guest_of(m), state.vm_accel
            agent = runtime.AgentSettings(
                site=self.site,
                server=site.control_server,
                passphrase_file=site.passphrase_file,
                registration_delay=site.agent_registration_delay,
            )
        if not workload:
            return
        peer = runtime.run_dir(self.lab_dir, self.site, after) / runtime.GUEST_STATUS if after else None
        try:
            runtime.start_machine(
                self.lab_dir, self.site, value, rate=rate, after=peer, agent=agent, log_owner=owner,
                guest=guest, accel=accel,
            )  # fmt: skip
        except BaseException:
            if not was_on:
                with self.store.edit() as state:
                    m = self._find(state.site(self.site), machine)
                    m.power_state, m.powered_on_at = PowerState.OFF, None
            raise

    def log_owner(self, machine: str) -> str:
        """Whose log the machine's guest writes: its own name unless it is a copy of another machine."""
        m = self._find(self._site(self.store.read()), machine)
        return m.log_owner or m.name

    def guest_kind(self, machine: str) -> GuestKind:
        state = self.store.read()
        return state.guest_of(self._find(self._site(state), machine))

    def set_log_owner(self, machine: str, owner: str) -> None:
        with self.store.edit() as state:
            self._find(state.site(self.site), machine).log_owner = owner

    # The lab is the GuestOracle (fabrics.base): its guests write the self-verifying log.
    def guest_flushed(self, machine: str) -> int | None:
        status = runtime.guest_status(self.lab_dir, self.site, machine)
        return status.flushed if status is not None else None

    def guest_start_verdict(self, machine: str, since: float) -> dict[str, object] | None:
        status = runtime.guest_status(self.lab_dir, self.site, machine)
        if status is not None and status.updated_at >= since and status.start_verdict:
            return dict(status.start_verdict)
        return None

    def power_off(self, machine: str) -> None:
        site = self._site(self.store.read(), "power_off")
        m = self._find(site, machine)
        runtime.stop_machine(self.lab_dir, self.site, m.name)
        with self.store.edit() as state:
            m = self._find(state.site(self.site), machine)
            m.power_state, m.powered_on_at = PowerState.OFF, None

    def create_machine(self, spec: MachineSpec) -> Machine:
        with self.store.edit() as state:
            site = self._site(state, "create_machine")
            if site.find_machine(spec.name) is not None:
                raise FabricError(
                    "machine-exists",
                    f"Site {site.name} already has a machine named {spec.name}.",
                    "Choose another name or delete the existing machine first.",
                )
            if site.kind is SiteKind.CLOUD:
                group = spec.datastore or (site.resource_groups[0].name if site.resource_groups else "")
                if not any(g.name == group for g in site.resource_groups):
                    raise FabricError(
                        "resource-group-not-found",
                        f"Site {site.name} has no resource group {group!r}.",
                        "Name an existing resource group as the target.",
                    )
                folder, host, datastore = cloud_disk_path(group, spec.name, "x"), "", ""
            else:
                self._check_placement(site, spec.host, spec.datastore)
                group, host, datastore = "", spec.host, spec.datastore
                folder = onprem_disk_path(datastore, spec.name, "x")
            disks = [
                self._new_disk(Path(folder).parent, d.label, d.size_bytes, d.backing, datastore)
                for d in spec.disks
            ]
            m = LabMachine(
                id=state.new_id("vm"),
                name=spec.name,
                bios_uuid=str(uuid.uuid4()),
                os_type=spec.os_type,
                os_version=spec.os_version,
                host=host,
                resource_group=group,
                origin=CloudOrigin.FAILOVER if site.kind is SiteKind.CLOUD else None,
                controllers=[LabController(key=CONTROLLER_KEY)],
                disks=disks,
                nics=[
                    LabNic(
                        name=n.name,
                        mac=n.mac,
                        ip_mode=n.ip_mode,
                        address=n.address,
                        prefix=n.prefix,
                        gateway=n.gateway,
                        network=n.network,
                    )
                    for n in spec.nics
                ],
            )
            site.machines.append(m)
            return self._machine(m)

    def _check_placement(self, site: LabSite, host: str, datastore: str) -> None:
        if site.find_host(host) is None:
            raise FabricError(
                "host-not-found",
                f"Site {site.name} has no host {host!r}.",
                "Choose one of the discovered hosts.",
            )
        ds = site.find_datastore(datastore)
        if ds is None:
            raise FabricError(
                "datastore-not-found",
                f"Site {site.name} has no datastore {datastore!r}.",
                "Choose one of the discovered datastores.",
            )
        if not any(mt.host == host and mt.read_write for mt in ds.mounts):
            raise FabricError(
                "datastore-not-writable",
                f"Datastore {datastore} is not mounted read/write on host {host}.",
                f"Mount {datastore} read/write on {host} or choose another datastore.",
            )

    def _new_disk(self, folder: Path, label: str, size: int, backing: str, datastore: str) -> LabDisk:
        if backing:
            stored = self._stored(backing)
            path = self.lab_dir / stored
            if not path.is_file():
                raise FabricError(
                    "disk-not-found",
                    f"Disk image {path} does not exist.",
                    "Give the path of an existing image, or none to create a new disk.",
                )
            size = path.stat().st_size
        else:
            stored = str(folder / f"{label}.img")
            make_sparse_image(self.lab_dir / stored, size)
        return LabDisk(
            uuid=str(uuid.uuid4()),
            label=label,
            size_bytes=size,
            backing=stored,
            datastore=datastore,
            controller_key=CONTROLLER_KEY,
        )

    def delete_machine(self, machine: str) -> None:
        with self.store.edit() as state:
            site = self._site(state, "delete_machine")
            m = self._find(site, machine)
            if m.power_state is PowerState.ON:
                raise FabricError(
                    "machine-powered-on",
                    f"Machine {m.name} is powered on.",
                    f"Power {m.name} off before deleting it.",
                )
            lab_snapshots.remove_all(self.lab_dir, m)
            site.machines.remove(m)
            still_used = {
                d.backing for s in state.sites.values() for other in s.machines for d in other.disks
            }
            for d in m.disks:
                path = self.lab_dir / d.backing
                # Like vSphere's "delete from disk": the machine's own files go, shared ones stay.
                if d.backing not in still_used and path.parent.name == m.name:
                    path.unlink(missing_ok=True)
                    if path.parent.is_dir() and not any(path.parent.iterdir()):
                        path.parent.rmdir()

    def attach_disks(self, machine: str, disks: Sequence[Disk]) -> None:
        with self.store.edit() as state:
            m = self._find(self._site(state, "attach_disks"), machine)
            attached = {d.uuid for d in m.disks}
            key = m.controllers[0].key if m.controllers else CONTROLLER_KEY
            for disk in disks:
                stored = self._stored(disk.backing)
                if not (self.lab_dir / stored).is_file():
                    raise FabricError(
                        "disk-not-found",
                        f"Disk {disk.label} ({disk.uuid}) has no image at {disk.backing}.",
                        "Attach a disk whose image exists; rediscover the site first.",
                    )
                if disk.uuid in attached:
                    continue  # attaching is idempotent so a replayed workflow step is harmless
                m.disks.append(
                    LabDisk(
                        uuid=disk.uuid,
                        label=disk.label,
                        size_bytes=disk.size_bytes,
                        backing=stored,
                        datastore=disk.datastore,
                        controller_key=key,
                    )
                )
                attached.add(disk.uuid)

    def detach_disks(self, machine: str, disk_uuids: Sequence[str]) -> tuple[Disk, ...]:
        with self.store.edit() as state:
            m = self._find(self._site(state, "detach_disks"), machine)
            by_uuid = {d.uuid: d for d in m.disks}
            unknown = [u for u in disk_uuids if u not in by_uuid]
            if unknown:
                raise FabricError(
                    "disk-not-attached",
                    f"Machine {m.name} has no disk with UUID {', '.join(unknown)}.",
                    f"Rediscover the site and detach only disks attached to {m.name}.",
                )
            moved = [
                by_uuid[u]
                for u in disk_uuids
                if by_uuid[u].moved_from is not None or not (self.lab_dir / by_uuid[u].backing).exists()
            ]
            if moved:
                raise _disks_moved(m, moved)
            m.disks = [d for d in m.disks if d.uuid not in set(disk_uuids)]
            return tuple(self._disk(by_uuid[u]) for u in disk_uuids)

    def consolidate_snapshots(self, machine: str) -> int:
        with self.store.edit() as state:
            m = self._find(self._site(state, "consolidate_snapshots"), machine)
            return lab_snapshots.remove_all(self.lab_dir, m)

    def create_snapshot(self, machine: str, name: str) -> Snapshot:
        with self.store.edit() as state:
            m = self._find(self._site(state, "create_snapshot"), machine)
            return lab_snapshots.create(self.lab_dir, m, state.new_id("snapshot"), name)

    def revert_to_snapshot(self, machine: str, snapshot_id: str) -> None:
        with self.store.edit() as state:
            m = self._find(self._site(state, "revert_to_snapshot"), machine)
            lab_snapshots.revert(self.lab_dir, m, snapshot_id)

    def remove_snapshot(self, machine: str, snapshot_id: str) -> None:
        with self.store.edit() as state:
            m = self._find(self._site(state, "remove_snapshot"), machine)
            lab_snapshots.remove(self.lab_dir, m, snapshot_id)

    def move_storage(self, machine: str, datastore: str) -> None:
        """Storage vMotion: every disk of the machine moves into its folder on `datastore`."""
        with self.store.edit() as state:
            site = self._site(state, "move_storage")
            m = self._find(site, machine)
            self._check_placement(site, m.host, datastore)
            folder = Path(onprem_disk_path(datastore, m.name, "x")).parent
            (self.lab_dir / folder).mkdir(parents=True, exist_ok=True)
            foreign = 0
            for d in m.disks:
                source = Path(d.backing)
                own = source.parent.name == m.name
                if own:
                    target = folder / source.name
                else:
                    # vSphere renames attached disks after the VM that now owns them.
                    foreign += 1
                    target = folder / f"{m.name}_{foreign}.img"
                if target == source:
                    continue
                (self.lab_dir / source).rename(self.lab_dir / target)
                if not own:
                    d.moved_from = str(source)
                d.backing, d.datastore = str(target), datastore

    # ---- lookups ---------------------------------------------------------------------------

    def _site(self, state: LabState, operation: str | None = None) -> LabSite:
        site = state.site(self.site)
        if not site.reachable:
            raise FabricError(
                "site-unreachable",
                f"Site {site.name} of lab {self.lab_dir} does not answer.",
                f"Make it reachable: `siterecovery lab set {self.lab_dir} site {site.name} reachable=true`.",
            )
        if operation and self.enforce_privileges and site.kind is SiteKind.VCENTER:
            missing = [p for p in _NEEDS[operation] if p not in site.account.privileges]
            if missing:
                raise FabricError(
                    "vcenter-insufficient-privileges",
                    f"The account of site {site.name} lacks {', '.join(missing)} needed to {operation}.",
                    "Grant the privileges to the vCenter account, or update its credentials.",
                )
        return site

    def _find(self, site: LabSite, ident: str) -> LabMachine:
        m = site.find_machine(ident)
        if m is None:
            raise FabricError(
                "machine-not-found",
                f"Site {site.name} has no machine {ident!r}.",
                "Rediscover the site and use a listed machine.",
            )
        return m


def _disks_moved(m: LabMachine, moved: Sequence[LabDisk]) -> FabricError:
    where = "; ".join(
        f"{d.label} {d.uuid} now at {d.backing} (was {d.moved_from or 'unknown'})" for d in moved
    )
    return FabricError(
        "mt-disks-moved",
        f"Disks attached to master target {m.name} were moved by storage migration and cannot be "
        f"detached: {where}.",
        f"Recover by hand: find the disks at the paths above, detach them from {m.name}, attach them to "
        "the protected machine, and power it on; then exclude the master target from Storage vMotion/DRS.",
    )
