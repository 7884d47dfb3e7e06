"""Discovery of a vCenter's inventory in a few round trips, mapped to the typed `Inventory`.

One ContainerView over the root folder (or one datacenter) and one PropertyCollector request
(continued page by page) fetch the hosts, datastores and machines with only the properties the
prerequisite checks read — never one call per VM, which would not scale to thousands. One more
call fetches every host's licence, and one the session account's privileges. vCenter leaves out
objects the account may not see, so a read-only account finds no datastores: that is reported as
a warning, never as an empty site.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from pyVmomi import vim as _vim
from pyVmomi import vmodl as _vmodl

from siterecovery.fabrics.base import (
    Datastore,
    DatastoreMount,
    DatastoreType,
    Disk,
    Host,
    HypervisorKind,
    Inventory,
    IpMode,
    LicenceEdition,
    Machine,
    Nic,
    OsType,
    PowerState,
    ScsiController,
    ScsiType,
    SiteKind,
    Snapshot,
)

# pyVmomi's stubs leave its data-object constructors untyped; its types are dynamic: use them as Any.
vim: Any = _vim
vmodl: Any = _vmodl

PC = vmodl.query.PropertyCollector

HOST_PROPS = ["name", "summary.config.product"]
DATASTORE_PROPS = [
    "name",
    "summary.type",
    "summary.accessible",
    "summary.capacity",
    "summary.freeSpace",
    "host",
]
VM_PROPS = [
    "name",
    "config.uuid",
    "config.instanceUuid",
    "config.guestId",
    "config.guestFullName",
    "config.template",
    "config.extraConfig",
    "config.hardware.device",
    "guest.guestFamily",
    "guest.toolsRunningStatus",
    "guest.net",
    "runtime.powerState",
    "runtime.host",
    "snapshot",
]

_DATASTORE_TYPES = {
    "VMFS": DatastoreType.VMFS,
    "NFS": DatastoreType.NFS,
    "NFS41": DatastoreType.NFS,
    "vsan": DatastoreType.VSAN,
    "VVOL": DatastoreType.VVOL,
}
_DATASTORE_IN_PATH = re.compile(r"^\[([^\]]*)\]")


@dataclass(frozen=True)
class Found:
    """One managed object and the properties the collector returned for it."""

    ref: Any
    props: Mapping[str, Any]


def collect(si: Any, root: Any, kinds: Mapping[Any, list[str]]) -> Iterator[Found]:
    """Every object of the given types under `root` with the given properties, page by page."""
    content = si.content
    view = content.viewManager.CreateContainerView(root, list(kinds), True)
    try:
        spec = PC.FilterSpec(
            objectSet=[
                PC.ObjectSpec(
                    obj=view,
                    skip=True,
                    selectSet=[
                        PC.TraversalSpec(name="view", type=vim.view.ContainerView, path="view", skip=False)
                    ],
                )
            ],
            propSet=[PC.PropertySpec(type=kind, pathSet=paths) for kind, paths in kinds.items()],
        )
        yield from retrieve(si, spec)
    finally:
        view.Destroy()


def retrieve(si: Any, spec: Any) -> Iterator[Found]:
    pc = si.content.propertyCollector
    result = pc.RetrievePropertiesEx([spec], PC.RetrieveOptions(maxObjects=1000))
    while result is not None:
        for obj in result.objects or ():
            yield Found(obj.obj, {p.name: p.val for p in obj.propSet or ()})
        result = pc.ContinueRetrievePropertiesEx(result.token) if result.token else None


def licence_edition(info: Any) -> LicenceEdition | None:
    """vSphere's edition key → edition; None when the key is not one we know."""
    key = (info.editionKey or "").lower()
    if key == "eval":
        return LicenceEdition.EVALUATION
    # The free vSphere Hypervisor (ESXi free) is licensed as the "esxBasic" edition.
    if key.startswith("esxbasic") or "hypervisor" in (info.name or "").lower():
        return LicenceEdition.FREE
    if key.startswith("esxenterprise"):
        return LicenceEdition.ENTERPRISE
    if key.startswith(("esxstandard", "esxessentials", "esxacademic")):
        return LicenceEdition.STANDARD
    return None


def host_licences(si: Any) -> dict[str, Any]:
    """Licence info per host moId, from one LicenseAssignmentManager call."""
    manager = si.content.licenseManager.licenseAssignmentManager
    if manager is None:  # a standalone ESXi host has no assignment manager
        return {}
    return {a.entityId: a.assignedLicense for a in manager.QueryAssignedLicenses()}


def to_host(found: Found, licence: Any, warnings: list[str]) -> Host:
    name = found.props["name"]
    product = found.props.get("summary.config.product")
    edition = licence_edition(licence) if licence is not None else LicenceEdition.EVALUATION
    if licence is None:
        warnings.append(f"Host {name} has no licence assigned; it is taken to run in evaluation mode.")
    if edition is None:
        warnings.append(
            f"Host {name} has licence edition {licence.editionKey!r} ({licence.name}), which "
            "siterecovery does not know; it is taken to be a paid edition."
        )
        edition = LicenceEdition.STANDARD
    version = f"{product.name} {product.version}".strip() if product is not None else ""
    return Host(id=found.ref._moId, name=name, kind=HypervisorKind.ESXI, licence=edition, version=version)


def to_datastore(found: Found, host_names: Mapping[str, str]) -> Datastore:
    name = found.props["name"]
    kind = _DATASTORE_TYPES.get(found.props.get("summary.type", ""), DatastoreType.OTHER)
    mounts = tuple(
        DatastoreMount(
            host=host_names.get(m.key._moId, m.key._moId),
            read_write=m.mountInfo.accessMode == "readWrite" and m.mountInfo.mounted is not False,
        )
        for m in found.props.get("host", ())
    )
    return Datastore(
        id=found.ref._moId,
        name=name,
        type=kind,
        accessible=bool(found.props.get("summary.accessible")),
        capacity_bytes=int(found.props.get("summary.capacity") or 0),
        free_bytes=int(found.props.get("summary.freeSpace") or 0),
        mounts=mounts,
    )


def datastore_of(file_name: str) -> str:
    match = _DATASTORE_IN_PATH.match(file_name)
    return match.group(1) if match else ""


def to_disk(device: Any) -> Disk:
    backing = device.backing
    size = device.capacityInBytes or device.capacityInKB * 1024
    file_name = getattr(backing, "fileName", "") or ""
    return Disk(
        uuid=getattr(backing, "uuid", "") or "",
        label=device.deviceInfo.label,
        size_bytes=int(size),
        backing=file_name,
        datastore=datastore_of(file_name),
        controller_key=device.controllerKey or 0,
    )


def scsi_type(device: Any) -> ScsiType | None:
    if isinstance(device, vim.vm.device.ParaVirtualSCSIController):
        return ScsiType.PVSCSI
    # Parallel and SAS are both LSI Logic as far as the master-target rule goes.
    if isinstance(
        device, vim.vm.device.VirtualLsiLogicController | vim.vm.device.VirtualLsiLogicSASController
    ):
        return ScsiType.LSILOGIC
    return None


def to_nic(device: Any, guest_net: Mapping[str, Any]) -> Nic:
    mac = device.macAddress or ""
    info = guest_net.get(mac.lower())
    address, prefix, mode = "", 0, IpMode.DHCP
    if info is not None and info.ipConfig is not None:
        v4 = [a for a in info.ipConfig.ipAddress or () if ":" not in a.ipAddress]
        if v4:
            address, prefix = v4[0].ipAddress, int(v4[0].prefixLength or 0)
        dhcp = info.ipConfig.dhcp
        mode = (
            IpMode.DHCP if dhcp is not None and dhcp.ipv4 is not None and dhcp.ipv4.enable else IpMode.STATIC
        )
    elif info is not None and info.ipAddress:
        address = next((a for a in info.ipAddress if ":" not in a), "")
    network = getattr(device.backing, "deviceName", "") or ""
    return Nic(
        name=device.deviceInfo.label, mac=mac, ip_mode=mode, address=address, prefix=prefix, network=network
    )


def snapshot_nodes(tree: Any) -> Iterator[Any]:
    """Every node of a machine's snapshot tree (its `rootSnapshotList`), breadth first."""
    queue = list(tree or ())
    while queue:
        node = queue.pop(0)
        yield node
        queue.extend(node.childSnapshotList or ())


def snapshots(tree: Any) -> tuple[Snapshot, ...]:
    return tuple(Snapshot(id=node.snapshot._moId, name=node.name) for node in snapshot_nodes(tree))


def os_type(guest_family: str, guest_id: str) -> OsType:
    if guest_family == "windowsGuest" or guest_id.lower().startswith("win"):
        return OsType.WINDOWS
    return OsType.LINUX


def extra_config(options: Any) -> dict[str, str]:
    out: dict[str, str] = {}
    for option in options or ():
        # Setting a key to "" removes it in vSphere; later entries override earlier ones.
        value = "" if option.value is None else str(option.value)
        if value:
            out[option.key] = value
        else:
            out.pop(option.key, None)
    return out


def to_machine(found: Found, host_names: Mapping[str, str]) -> Machine:
    p = found.props
    devices = p.get("config.hardware.device") or ()
    guest_net = {(n.macAddress or "").lower(): n for n in p.get("guest.net") or ()}
    controllers = tuple(ScsiController(key=d.key, type=t) for d in devices if (t := scsi_type(d)) is not None)
    host = p.get("runtime.host")
    return Machine(
        id=found.ref._moId,
        name=p["name"],
        bios_uuid=p.get("config.uuid") or "",
        os_type=os_type(p.get("guest.guestFamily") or "", p.get("config.guestId") or ""),
        os_version=p.get("config.guestFullName") or "",
        power_state=PowerState.ON if p.get("runtime.powerState") == "poweredOn" else PowerState.OFF,
        host=host_names.get(host._moId, host._moId) if host is not None else "",
        tools_running=p.get("guest.toolsRunningStatus") == "guestToolsRunning",
        extra_config=extra_config(p.get("config.extraConfig")),
        snapshots=snapshots(p["snapshot"].rootSnapshotList if p.get("snapshot") else None),
        controllers=controllers,
        disks=tuple(to_disk(d) for d in devices if isinstance(d, vim.vm.device.VirtualDisk)),
        nics=tuple(to_nic(d, guest_net) for d in devices if isinstance(d, vim.vm.device.VirtualEthernetCard)),
    )


def privileges(si: Any) -> frozenset[str]:
    """The session account's privileges on the root folder (propagated to everything below)."""
    content = si.content
    user = content.sessionManager.currentSession.userName
    result = content.authorizationManager.FetchUserPrivilegeOnEntities([content.rootFolder], user)
    return frozenset(p for r in result or () for p in r.privileges or ())


def discover(si: Any, site: str, root: Any) -> Inventory:
    """The whole inventory under `root` (root folder or a datacenter)."""
    found = list(
        collect(
            si,
            root,
            {vim.HostSystem: HOST_PROPS, vim.Datastore: DATASTORE_PROPS, vim.VirtualMachine: VM_PROPS},
        )
    )
    warnings: list[str] = []
    licences = host_licences(si)
    hosts = [
        to_host(f, licences.get(f.ref._moId), warnings) for f in found if isinstance(f.ref, vim.HostSystem)
    ]
    host_names = {h.id: h.name for h in hosts}
    datastores = [to_datastore(f, host_names) for f in found if isinstance(f.ref, vim.Datastore)]
    machines = [
        to_machine(f, host_names)
        for f in found
        if isinstance(f.ref, vim.VirtualMachine) and not f.props.get("config.template")
    ]
    granted = privileges(si)
    if not datastores:
        lacking = "" if "Datastore.Browse" in granted else " The account lacks Datastore.Browse."
        warnings.append(
            f"No datastores are visible to the vCenter account.{lacking} A read-only account sees none: "
            "update the vCenter credentials of the site to an account with the privileges in "
            "docs/vsphere.md and discover again."
        )
    return Inventory(
        site=site,
        kind=SiteKind.VCENTER,
        discovered_at=time.time(),
        hosts=tuple(sorted(hosts, key=lambda h: h.name)),
        datastores=tuple(sorted(datastores, key=lambda d: d.name)),
        machines=tuple(sorted(machines, key=lambda m: m.name)),
        privileges=granted,
        warnings=tuple(warnings),
    )
