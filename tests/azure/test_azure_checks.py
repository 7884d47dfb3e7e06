"""Prerequisites of a failover to Azure, read from the fabric's capacity (FakeArm's catalogue and quota)."""

from __future__ import annotations

import pytest

from siterecovery.dr.azure_checks import (
    AZURE_FAILOVER_RULES,
    check_azure_failover,
    check_onprem_route,
    check_sas,
)
from siterecovery.dr.rules import RULES
from siterecovery.fabrics.azure import AzureFabric
from siterecovery.fabrics.azure_arm import ArmConnection, VmCreate
from siterecovery.fabrics.base import Disk, Machine, OsType, PowerState
from tests.azure.conftest import Azurite
from tests.azure.fabric_cases import write_replica
from tests.azure.fake_arm import FakeArm

MiB = 1 << 20


def machine(name: str, *sizes: int) -> Machine:
    disks = tuple(Disk(f"{name}-{i}", f"disk{i}", size, f"{name}-{i}.vhd") for i, size in enumerate(sizes))
    return Machine(name, name, name, OsType.LINUX, "", PowerState.ON, disks=disks)


@pytest.fixture
def fabric(azurite: Azurite) -> AzureFabric:
    arm = FakeArm(azurite.container("disks"), core_quota=6)
    return AzureFabric("azure", "cloud", arm, azurite.container("replicas"), subnet_id="subnet")


def codes(fabric: AzureFabric, machines: list[Machine], size: str = "Standard_D2s_v3") -> list[str]:
    return [p.code for p in check_azure_failover(fabric.capacity(), machines, size)]


CASES = [
    pytest.param([machine("web", 64 * MiB)], "Standard_D2s_v3", [], id="healthy"),
    pytest.param([machine("web", 64 * MiB)], "Standard_M416", ["azure-vm-size-unavailable"], id="az-size"),
    pytest.param(
        [machine("db", 64 * MiB, *[MiB] * 3)], "Standard_B1s", ["azure-too-many-disks"], id="az-disks"
    ),
    pytest.param(
        [machine("web", 64 * MiB + 512)],
        "Standard_D2s_v3",
        ["azure-disk-size-unsupported"],
        id="az-disk-size",
    ),
    pytest.param(
        [machine(f"m{i}", 64 * MiB) for i in range(4)],
        "Standard_D2s_v3",
        ["azure-core-quota"],
        id="az-quota",
    ),
]


@pytest.mark.parametrize(("machines", "size", "expected"), CASES)
def test_each_rule(fabric: AzureFabric, machines: list[Machine], size: str, expected: list[str]) -> None:
    problems = check_azure_failover(fabric.capacity(), machines, size)
    assert [p.code for p in problems] == expected
    for problem in problems:
        assert problem.rule == RULES[problem.code].id
        for text in (problem.message, problem.remediation):
            assert text.endswith(".") and ". " not in text and "{" not in text, text


def test_every_azure_rule_has_a_case() -> None:
    cased = {code for p in CASES for code in p.values[2]}  # type: ignore[attr-defined]
    cased.add("azure-region-unavailable")  # a fabric of its own (the test below)
    assert cased == {r.code for r in AZURE_FAILOVER_RULES}


def test_a_region_the_subscription_cannot_use_is_named_with_every_other_failing_rule(
    azurite: Azurite,
) -> None:
    arm = FakeArm(azurite.container("disks"), location="atlantis")
    fabric = AzureFabric("azure", "cloud", arm, azurite.container("replicas"), subnet_id="subnet")
    problems = check_azure_failover(fabric.capacity(), [machine("web", 64 * MiB + 512)], "Standard_D2s_v3")
    # Not also "VM size unavailable": no size is, the region is what is wrong.
    assert [(p.code, p.rule) for p in problems] == [
        ("azure-region-unavailable", "AZ-REGION"),
        ("azure-disk-size-unsupported", "AZ-DISK-SIZE"),
    ]
    assert "'atlantis'" in problems[0].message and "atlantis is not one" in problems[0].remediation


VNET = "/subscriptions/0/resourceGroups/rg-net/providers/Microsoft.Network/virtualNetworks/vnet"


@pytest.mark.parametrize(
    ("connections", "failing"),
    [
        ([], True),
        ([ArmConnection("to-onprem", VNET, "NotConnected")], True),
        ([ArmConnection("elsewhere", VNET + "2", "Connected")], True),  # another network's gateway
        ([ArmConnection("to-onprem", VNET, "Connecting"), ArmConnection("backup", VNET, "Connected")], False),
    ],
)
def test_the_recovery_network_routes_to_on_premises(
    fabric: AzureFabric, connections: list[ArmConnection], failing: bool
) -> None:
    arm = fabric.arm
    assert isinstance(arm, FakeArm)
    arm.connections = connections
    problems = check_onprem_route(arm.gateway_connections(), f"{VNET}/subnets/recovery")
    assert [(p.code, p.rule) for p in problems] == (
        [("azure-onprem-unreachable", "AZ-VPN")] if failing else []
    )
    for p in problems:
        assert "vnet" in p.remediation and "{" not in p.remediation
        assert all(f"{c.name} {c.status}" in p.message for c in connections if c.vnet_id == VNET)


def test_all_failing_rules_at_once_and_quota_counts_running_vms(fabric: AzureFabric) -> None:
    bad = [machine("db", 64 * MiB + 512, *[MiB] * 9)]
    assert codes(fabric, bad) == ["azure-too-many-disks", "azure-disk-size-unsupported"]
    problems = check_azure_failover(fabric.capacity(), [machine("web", 64 * MiB)] * 3, "Standard_D2s_v3")
    assert problems == []  # 3 x 2 cores = the quota of 6
    # A running VM in the region uses 2 of the cores: the same failover no longer fits.
    arm = fabric.arm
    assert isinstance(arm, FakeArm)
    write_replica(fabric.replicas, "x.vhd", MiB, [])
    d = arm.import_disk("x", fabric.replicas.get_blob_client("x.vhd").url, MiB, OsType.LINUX)
    arm.create_vm(VmCreate("x", "Standard_D2s_v3", OsType.LINUX, d.id, (), (), {}))
    (problem,) = check_azure_failover(fabric.capacity(), [machine("web", 64 * MiB)] * 3, "Standard_D2s_v3")
    assert problem.code == "azure-core-quota" and problem.rule == "AZ-QUOTA"
    assert "8 cores" in problem.message and "westeurope" in problem.remediation


DAY = 24 * 3600


@pytest.mark.parametrize(
    ("seconds", "failing"),
    [(29, True), (30, False), (4 * 3600, False), (60 * DAY, False), (60 * DAY + 1, True)],
)
def test_the_sas_duration_is_one_arm_grants(seconds: int, failing: bool) -> None:
    problems = check_sas(seconds)
    assert [p.code for p in problems] == (["azure-sas-duration"] if failing else [])
    for p in problems:
        assert p.rule == RULES[p.code].id and str(seconds) in p.remediation and "{" not in p.remediation


def test_a_disk_or_snapshot_already_read_through_a_sas_is_named(fabric: AzureFabric) -> None:
    arm = fabric.arm
    assert isinstance(arm, FakeArm)
    write_replica(fabric.replicas, "web.vhd", MiB, [(0, 4096)])
    disk = arm.import_disk("web-os", fabric.replicas.get_blob_client("web.vhd").url, MiB, OsType.LINUX)
    nic = arm.create_nic("web-nic", "subnet", "")
    arm.create_vm(VmCreate("web", "Standard_B1s", OsType.LINUX, disk.id, (), (nic.id,), {}))
    fabric.create_snapshot("web", "failback-sync-1")
    other = arm.import_disk("other-os", fabric.replicas.get_blob_client("web.vhd").url, MiB, None)
    assert fabric.active_reads("web") == []
    arm.disk_read_url("web-os", 60)
    arm.snapshot_read_url("web-failback-sync-1-os", 60)
    arm.disk_read_url(other.name, 60)  # not the VM's: someone else's export is no concern here
    active = fabric.active_reads("web")
    assert active == ["web-failback-sync-1-os", "web-os"]
    problems = check_sas(4 * 3600, active)
    assert [(p.code, p.rule) for p in problems] == [("azure-sas-active", "AZ-SAS-ACTIVE")] * 2
    assert "web-os" in problems[1].message and "web-os" in problems[1].remediation
    arm.end_disk_read("web-os")
    arm.end_snapshot_read("web-failback-sync-1-os")
    assert fabric.active_reads("web") == []
