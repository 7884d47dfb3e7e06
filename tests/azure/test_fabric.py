"""The Azure fabric on FakeArm, whose managed disks are page blobs in a real Azurite."""

from __future__ import annotations

import pytest

from siterecovery.dataplane.changed_ranges import DiffMethod
from siterecovery.fabrics.azure import AzureFabric
from siterecovery.fabrics.azure_arm import VmCreate
from siterecovery.fabrics.base import CloudOrigin, Disk, FabricError, IpMode, OsType, PowerState
from tests.azure import fabric_cases as cases
from tests.azure.conftest import Azurite
from tests.azure.fake_arm import FakeArm

SUBNET = (
    "/subscriptions/0/resourceGroups/rg-net/providers/Microsoft.Network/virtualNetworks/vnet/subnets/recovery"
)


@pytest.fixture
def site(azurite: Azurite) -> cases.Site:
    arm = FakeArm(azurite.container("disks"))
    replicas = azurite.container("replicas")
    return cases.Site(AzureFabric("azure", "cloud", arm, replicas, subnet_id=SUBNET), arm, replicas)


def test_failover_snapshot_revert_and_delete(site: cases.Site) -> None:
    name, digests = cases.failover(site)
    cases.case_failover_creates_the_vm_on_disks_imported_from_the_replicas(site, name, digests)
    cases.case_snapshot_revert_and_remove(site, name, digests)
    cases.case_delete_machine_removes_vm_nics_and_disks(site, name)


def test_the_diff_self_test_picks_the_content_compare_on_azurite(site: cases.Site) -> None:
    choice = cases.case_the_diff_self_test_reaches_a_verdict_and_leaves_no_probe(site)
    assert choice.method is DiffMethod.CONTENT and "no cleared range" in choice.reason, choice


def test_discovery_maps_a_hand_made_vm_and_refuses_what_azure_refuses(site: cases.Site) -> None:
    arm = site.arm
    assert isinstance(arm, FakeArm)
    cases.write_replica(site.replicas, "web.vhd", 1 << 20, [(0, 4096)])
    disk = arm.import_disk("web-os", site.replicas.get_blob_client("web.vhd").url, 1 << 20, OsType.WINDOWS)
    spare = arm.import_disk("spare", site.replicas.get_blob_client("web.vhd").url, 1 << 20, None)
    nic = arm.create_nic("web-nic", SUBNET, "")
    arm.create_vm(VmCreate("web", "Standard_B1s", OsType.WINDOWS, disk.id, (), (nic.id,), {}))

    vm = site.fabric.discover().machine("web")
    assert vm is not None
    assert vm.origin is CloudOrigin.MANUAL  # not created by a failover: not reprotectable (RP-ELIGIBLE)
    assert (vm.os_type, vm.power_state, vm.resource_group) == (OsType.WINDOWS, PowerState.ON, "rg-recovery")
    assert [(d.uuid, d.backing) for d in vm.disks] == [(disk.unique_id, disk.id)]
    assert [(n.ip_mode, n.network, n.mac) for n in vm.nics] == [(IpMode.DHCP, SUBNET, nic.mac)]

    site.fabric.attach_disks("web", [Disk(spare.unique_id, "spare", 1 << 20, spare.id)])
    vm = site.fabric.discover().machine("web")
    assert vm is not None and [d.label for d in vm.disks] == ["web-os", "spare"]
    assert [d.label for d in site.fabric.detach_disks("web", [spare.unique_id])] == ["spare"]

    with pytest.raises(FabricError) as running:
        site.fabric.delete_machine("web")
    assert running.value.code == "machine-powered-on"
    plain = site.replicas.get_blob_client("plain.img")  # a page blob without the VHD footer
    plain.create_page_blob(1 << 20)
    with pytest.raises(FabricError) as no_vhd:
        arm.import_disk("bad", plain.url, 1 << 20, None)
    assert "not a fixed VHD" in no_vhd.value.message
    assert "bad" not in {d.name for d in arm.list_disks()}
    with pytest.raises(FabricError) as moved:
        site.fabric.move_storage("web", "datastore1")
    assert moved.value.code == "azure-no-datastores"
