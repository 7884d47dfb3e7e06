"""Operations against vcsim: create, power, hot-add and remove disks, snapshots, storage moves."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pyVmomi import vim

from siterecovery.fabrics.base import (
    DiskSpec,
    FabricError,
    IpMode,
    MachineSpec,
    Nic,
    OsType,
    PowerState,
    ScsiType,
)

from .conftest import Vcsim, find, nas_datastore, reconfigure


def test_create_machine_round_trip(vcsim: Vcsim) -> None:
    progress: list[tuple[str, int]] = []
    spec = MachineSpec(
        name="created",
        host="DC0_C0_H1",
        datastore="LocalDS_0",
        os_type=OsType.WINDOWS,
        disks=(DiskSpec(label="os", size_bytes=32 << 20), DiskSpec(label="data", size_bytes=16 << 20)),
    )
    with vcsim.fabric(progress=lambda doing, pct: progress.append((doing, pct))) as fabric:
        made = fabric.create_machine(spec)
        assert made.name == "created" and made.host == "DC0_C0_H1" and made.power_state is PowerState.OFF
        assert made.os_type is OsType.WINDOWS and [c.type for c in made.controllers] == [ScsiType.LSILOGIC]
        assert [d.size_bytes for d in made.disks] == [32 << 20, 16 << 20]
        assert all(
            d.datastore == "LocalDS_0" and d.controller_key == made.controllers[0].key for d in made.disks
        )
        assert made.extra_config["disk.EnableUUID"] == "TRUE"
        assert fabric.discover().machine("created") == made
        assert ("create machine created on DC0_C0_H1 in LocalDS_0", 100) in progress
        with pytest.raises(FabricError) as err:
            fabric.create_machine(spec)
        assert err.value.code == "machine-exists"
        fabric.delete_machine("created")
        assert fabric.discover().machine("created") is None


@pytest.mark.parametrize(
    ("host", "datastore", "code"),
    [
        pytest.param("nohost", "LocalDS_0", "host-not-found", id="host-not-found"),
        pytest.param("DC0_H0", "nods", "datastore-not-found", id="datastore-not-found"),
    ],
)
def test_create_machine_refused(vcsim: Vcsim, host: str, datastore: str, code: str) -> None:
    with vcsim.fabric() as fabric, pytest.raises(FabricError) as err:
        fabric.create_machine(
            MachineSpec(name="refused", host=host, datastore=datastore, os_type=OsType.LINUX)
        )
    assert err.value.code == code


def test_new_machine_nics_join_a_network_of_its_host(vcsim: Vcsim) -> None:
    """RPW-6 recreates a machine from its recorded NICs: a NIC naming no network joins the host's
    first one; a network the host lacks is refused before anything is created."""
    nics = (Nic("eth0", "00:50:56:aa:bb:01", IpMode.DHCP), Nic("eth1", "", IpMode.DHCP, network="VM Network"))
    spec = MachineSpec("nics", "DC0_C0_H1", "LocalDS_0", OsType.LINUX, nics=nics)
    with vcsim.fabric() as fabric:
        made = fabric.create_machine(spec)
        try:
            assert [(n.network, n.mac) for n in made.nics][:1] == [("VM Network", "00:50:56:aa:bb:01")]
            assert [n.network for n in made.nics] == ["VM Network", "VM Network"]
        finally:
            fabric.delete_machine("nics")
        with pytest.raises(FabricError) as err:
            fabric.create_machine(
                MachineSpec(
                    "nonet",
                    "DC0_C0_H1",
                    "LocalDS_0",
                    OsType.LINUX,
                    nics=(Nic("eth0", "", IpMode.DHCP, network="dmz"),),
                )
            )
        assert err.value.code == "network-not-found" and "VM Network" in err.value.remediation
        assert fabric.discover().machine("nonet") is None


def test_power_on_off_is_idempotent(vcsim: Vcsim, fresh_vm: str) -> None:
    with vcsim.fabric() as fabric:
        fabric.power_on(fresh_vm)
        fabric.power_on(fresh_vm)
        assert fabric.discover().machine(fresh_vm).power_state is PowerState.ON
        with pytest.raises(FabricError) as err:
            fabric.delete_machine(fresh_vm)
        assert err.value.code == "machine-powered-on"
        fabric.power_off(fresh_vm)
        fabric.power_off(fresh_vm)
        assert fabric.discover().machine(fresh_vm).power_state is PowerState.OFF


def test_unknown_machine(vcsim: Vcsim) -> None:
    with vcsim.fabric() as fabric, pytest.raises(FabricError) as err:
        fabric.power_on("no-such-vm")
    assert err.value.code == "machine-not-found"


def test_hot_add_and_remove_disk_keeps_files(vcsim: Vcsim, fresh_vm: str) -> None:
    """A protected machine's disk attached to a master target and removed again, as reprotect/failback do."""
    with vcsim.fabric() as fabric:
        source = fabric.discover().machine(fresh_vm).disks[0]
        fabric.create_machine(
            MachineSpec(
                name="mt-hotadd",
                host="DC0_H0",
                datastore="LocalDS_0",
                os_type=OsType.LINUX,
                disks=(DiskSpec(label="os", size_bytes=16 << 20),),
            )
        )
        try:
            fabric.power_on("mt-hotadd")
            fabric.attach_disks("mt-hotadd", [source])
            fabric.attach_disks("mt-hotadd", [source])  # replayed step: nothing more attached
            mt = fabric.discover().machine("mt-hotadd")
            assert [d.backing for d in mt.disks][1:] == [source.backing]
            assert mt.disks[1].uuid == source.uuid
            assert mt.disks[1].controller_key == mt.controllers[0].key

            (removed,) = fabric.detach_disks("mt-hotadd", [source.uuid])
            assert removed.backing == source.backing
            assert [d.backing for d in fabric.discover().machine("mt-hotadd").disks] == [mt.disks[0].backing]
            # Removing did not destroy the file: the protected machine still has its disk.
            assert fabric.discover().machine(fresh_vm).disks[0].backing == source.backing
            with pytest.raises(FabricError) as err:
                fabric.detach_disks("mt-hotadd", [source.uuid])
            assert err.value.code == "disk-not-attached"
        finally:
            fabric.power_off("mt-hotadd")
            fabric.delete_machine("mt-hotadd")


def test_delete_master_target_keeps_borrowed_disks(vcsim: Vcsim, fresh_vm: str) -> None:
    with vcsim.fabric() as fabric:
        source = fabric.discover().machine(fresh_vm).disks[0]
        fabric.create_machine(
            MachineSpec(name="mt-delete", host="DC0_H0", datastore="LocalDS_0", os_type=OsType.LINUX)
        )
        fabric.attach_disks("mt-delete", [source])
        fabric.delete_machine("mt-delete")
        assert fabric.discover().machine(fresh_vm).disks[0].backing == source.backing


def test_sixteen_disks_use_a_second_lsi_controller(vcsim: Vcsim, fresh_vm: str) -> None:
    """15 units per controller: creating or hot-adding a 16th disk adds an LSI Logic controller."""
    disks = tuple(DiskSpec(label=f"x{i}", size_bytes=1 << 20) for i in range(16))
    with vcsim.fabric() as fabric:
        donor = fabric.create_machine(
            MachineSpec(
                name="donor16", host="DC0_H0", datastore="LocalDS_0", os_type=OsType.LINUX, disks=disks
            )
        )
        try:
            assert [c.type for c in donor.controllers] == [ScsiType.LSILOGIC, ScsiType.LSILOGIC]
            assert len(donor.disks) == 16
            fabric.attach_disks(fresh_vm, donor.disks)
            vm = fabric.discover().machine(fresh_vm)
            assert [c.type for c in vm.controllers] == [ScsiType.LSILOGIC, ScsiType.LSILOGIC]
            assert len(vm.disks) == 17
            fabric.detach_disks(fresh_vm, [d.uuid for d in donor.disks])
        finally:
            fabric.delete_machine("donor16")


def test_disks_moved_into_master_target_folder_refuse_detach(
    vcsim: Vcsim, admin_si: Any, fresh_vm: str
) -> None:
    """RP-MT-MOVE: Storage vMotion renames attached disks into the master target's own folder."""
    vm = find(admin_si, vim.VirtualMachine, fresh_vm)
    controller = next(
        d for d in vm.config.hardware.device if isinstance(d, vim.vm.device.VirtualSCSIController)
    )
    moved = vim.vm.device.VirtualDisk(
        key=-7,
        controllerKey=controller.key,
        unitNumber=5,
        capacityInKB=1024,
        backing=vim.vm.device.VirtualDisk.FlatVer2BackingInfo(
            fileName=f"[LocalDS_0] {fresh_vm}/{fresh_vm}_1.vmdk", diskMode="persistent"
        ),
    )
    reconfigure(
        vm,
        deviceChange=[vim.vm.device.VirtualDeviceSpec(operation="add", fileOperation="create", device=moved)],
    )
    with vcsim.fabric() as fabric:
        disk = next(d for d in fabric.discover().machine(fresh_vm).disks if d.backing.endswith("_1.vmdk"))
        with pytest.raises(FabricError) as err:
            fabric.detach_disks(fresh_vm, [disk.uuid])
    assert err.value.code == "mt-disks-moved" and disk.backing in err.value.message
    assert "Storage vMotion" in err.value.remediation


def test_move_storage(vcsim: Vcsim, admin_si: Any, fresh_vm: str, tmp_path: Path) -> None:
    export = tmp_path / "nfs-rw"
    with nas_datastore(admin_si, "DC0_H0", export), vcsim.fabric() as fabric:
        fabric.move_storage(fresh_vm, "nfs-rw")
        vm = find(admin_si, vim.VirtualMachine, fresh_vm)
        assert [d.name for d in vm.datastore] == ["nfs-rw"]
        with pytest.raises(FabricError) as err:
            fabric.move_storage(fresh_vm, "nope")
        assert err.value.code == "datastore-not-found"
        fabric.move_storage(fresh_vm, "LocalDS_0")
        assert [d.name for d in vm.datastore] == ["LocalDS_0"]
