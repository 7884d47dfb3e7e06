"""The lab provider's operations: create, attach, detach, consolidate, move, delete, power."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from siterecovery.fabrics.base import (
    CloudOrigin,
    DiskSpec,
    FabricError,
    MachineSpec,
    OsType,
    PowerState,
)

from .conftest import Lab


def test_create_machine_on_prem_and_in_the_cloud(lab: Lab) -> None:
    onprem = lab.fabric()
    made = onprem.create_machine(
        MachineSpec(
            "web2",
            "esx2",
            "ds-nfs1",
            OsType.LINUX,
            disks=(DiskSpec("disk0", 8 << 20), DiskSpec("data", 4 << 20)),
        )
    )
    assert [d.label for d in made.disks] == ["disk0", "data"]
    for d in made.disks:
        assert Path(d.backing) == lab.path / "datastores/ds-nfs1/web2" / f"{d.label}.img"
        assert os.path.getsize(d.backing) == d.size_bytes
    assert onprem.discover().machine("web2") == made

    source = onprem.discover().machine("web1")
    assert source is not None
    cloud = lab.fabric("cloud")
    vm = cloud.create_machine(
        MachineSpec(
            "web1",
            "",
            "rg-recovery",
            OsType.LINUX,
            disks=(DiskSpec("disk0", 0, backing=source.disks[0].backing), DiskSpec("temp", 4 << 20)),
        )
    )
    assert vm.origin is CloudOrigin.FAILOVER and vm.resource_group == "rg-recovery"
    assert vm.disks[0].backing == source.disks[0].backing  # the given image is used, not copied
    assert Path(vm.disks[1].backing) == lab.path / "cloud/rg-recovery/web1/temp.img"

    with pytest.raises(FabricError) as exists:
        cloud.create_machine(MachineSpec("web1", "", "rg-recovery", OsType.LINUX))
    assert exists.value.code == "machine-exists"
    lab.cli("set", str(lab.path), "datastore", "ds-vmfs1", "rw@esx2=false")
    with pytest.raises(FabricError) as readonly:
        onprem.create_machine(MachineSpec("web3", "esx2", "ds-vmfs1", OsType.LINUX))
    assert readonly.value.code == "datastore-not-writable"


def test_attach_detach_consolidate_round_trip(lab: Lab) -> None:
    fabric = lab.fabric()
    web1 = fabric.discover().machine("web1")
    assert web1 is not None
    fabric.attach_disks("mt-linux", web1.disks)
    fabric.attach_disks("mt-linux", web1.disks)  # idempotent: a replayed step changes nothing
    mt = fabric.discover().machine("mt-linux")
    assert mt is not None and [d.uuid for d in mt.disks][2:] == [web1.disks[0].uuid]
    assert mt.disks[2].backing == web1.disks[0].backing

    detached = fabric.detach_disks("mt-linux", [web1.disks[0].uuid])
    assert detached == (web1.disks[0],)
    assert len(fabric.discover().machine("mt-linux").disks) == 2  # type: ignore[union-attr]
    with pytest.raises(FabricError) as gone:
        fabric.detach_disks("mt-linux", [web1.disks[0].uuid])
    assert gone.value.code == "disk-not-attached"

    lab.cli("set", str(lab.path), "machine", "web1", "snapshot+=s1,s2", "snapshot+=s3")
    assert fabric.consolidate_snapshots("web1") == 3
    assert fabric.discover().machine("web1").snapshots == ()  # type: ignore[union-attr]
    assert fabric.consolidate_snapshots("web1") == 0


def test_move_storage_then_detach_fails_with_recovery_steps(lab: Lab) -> None:
    fabric = lab.fabric()
    web1 = fabric.discover().machine("web1")
    assert web1 is not None
    fabric.attach_disks("mt-linux", web1.disks)
    lab.cli("move", str(lab.path), "mt-linux", "ds-nfs1")

    mt = fabric.discover().machine("mt-linux")
    assert mt is not None and {d.datastore for d in mt.disks} == {"ds-nfs1"}
    moved = next(d for d in mt.disks if d.uuid == web1.disks[0].uuid)
    assert Path(moved.backing) == lab.path / "datastores/ds-nfs1/mt-linux/mt-linux_1.img"
    assert Path(moved.backing).exists() and not Path(web1.disks[0].backing).exists()
    with pytest.raises(FabricError) as refused:
        fabric.detach_disks("mt-linux", [web1.disks[0].uuid])
    assert refused.value.code == "mt-disks-moved"
    assert "mt-linux_1.img" in refused.value.message
    for step in ("find the disks", "attach them to", "power it on"):
        assert step in refused.value.remediation
    # The master target's own disks moved with it and still detach normally.
    assert fabric.detach_disks("mt-linux", [mt.disks[1].uuid])[0].label == "retention"


def test_delete_machine_removes_its_own_files(lab: Lab) -> None:
    fabric = lab.fabric()
    app1 = fabric.discover().machine("app1")
    assert app1 is not None
    fabric.power_on("mt-linux")  # no workload: only the power state changes
    with pytest.raises(FabricError) as on:
        fabric.delete_machine("mt-linux")
    assert on.value.code == "machine-powered-on"
    lab.cli("delete", str(lab.path), "app1")
    assert fabric.discover().machine("app1") is None and not Path(app1.disks[0].backing).exists()


def test_agent_registers_after_the_configured_delay(lab: Lab) -> None:
    fabric = lab.fabric()
    lab.cli("set", str(lab.path), "site", "onprem", "agent_registration_delay=900")
    assert fabric.agent_registration_delay == 900
    assert fabric.powered_on_at("mt-linux") is None and not fabric.agent_registered("mt-linux")
    fabric.power_on("mt-linux")
    started = fabric.powered_on_at("mt-linux")
    assert started is not None
    assert not fabric.agent_registered("mt-linux", now=started + 899)
    assert fabric.agent_registered("mt-linux", now=started + 900)
    fabric.power_off("mt-linux")
    assert fabric.powered_on_at("mt-linux") is None
    assert fabric.discover().machine("mt-linux").power_state is PowerState.OFF  # type: ignore[union-attr]
