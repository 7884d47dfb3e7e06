"""Virtual-device change specs for vCenter reconfigure and create calls.

Building the device list of a new machine and hot-adding existing disks both need free SCSI slots:
a controller has units 0-15 except 7 (the controller's own), and a VM at most four controllers.
Added controllers are LSI Logic because a master target must not use ParaVirtual ones (RP-MT-SCSI).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from pyVmomi import vim as _vim

from siterecovery.fabrics.base import FabricError

# pyVmomi's stubs leave its data-object constructors untyped; its types are dynamic: use them as Any.
vim: Any = _vim

Spec = vim.vm.device.VirtualDeviceSpec
_UNITS = tuple(u for u in range(16) if u != 7)
_MAX_CONTROLLERS = 4


class TempKeys:
    """Negative device keys, unique within one spec, as vCenter requires for new devices."""

    def __init__(self) -> None:
        self._next = -100

    def __call__(self) -> int:
        self._next -= 1
        return self._next


def lsi_controller(key: int, bus: int) -> Any:
    controller = vim.vm.device.VirtualLsiLogicController(
        key=key, busNumber=bus, sharedBus=vim.vm.device.VirtualSCSIController.Sharing.noSharing
    )
    return Spec(operation=Spec.Operation.add, device=controller)


def disk_device(key: int, controller_key: int, unit: int, size_bytes: int, file_name: str) -> Any:
    backing = vim.vm.device.VirtualDisk.FlatVer2BackingInfo(
        fileName=file_name, diskMode="persistent", thinProvisioned=True
    )
    return vim.vm.device.VirtualDisk(
        key=key,
        controllerKey=controller_key,
        unitNumber=unit,
        backing=backing,
        capacityInKB=size_bytes // 1024,
        capacityInBytes=size_bytes,
    )


def slots(
    devices: Sequence[Any], keys: TempKeys, changes: list[Any], machine: str
) -> Iterator[tuple[int, int]]:
    """Free (controller key, unit) pairs, adding LSI Logic controllers to `changes` when full."""
    controllers = [d for d in devices if isinstance(d, vim.vm.device.VirtualSCSIController)]
    used = {(d.controllerKey, d.unitNumber) for d in devices if getattr(d, "controllerKey", None) is not None}
    for c in controllers:
        for unit in _UNITS:
            if (c.key, unit) not in used:
                yield c.key, unit
    buses = {c.busNumber for c in controllers}
    for bus in range(_MAX_CONTROLLERS):
        if bus in buses:
            continue
        key = keys()
        changes.append(lsi_controller(key, bus))
        for unit in _UNITS:
            yield key, unit
    raise FabricError(
        "mt-disk-limit",
        f"Machine {machine} has no free SCSI slot left "
        f"({_MAX_CONTROLLERS} controllers x {len(_UNITS)} disks).",
        f"Detach disks from {machine} or use another master target.",
    )
