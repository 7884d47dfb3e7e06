"""The Azure fabric's cases, run on `FakeArm` + Azurite (test_fabric.py) and on a real subscription
(test_arm_contract.py, when credentials are set): the same functions, so the fake answers as ARM does."""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass

import xxhash
from azure.storage.blob import BlobClient, ContainerClient

from siterecovery.dataplane.page_blob import STORAGE_API_VERSION, PageBlobWriter
from siterecovery.fabrics.azure import AzureFabric
from siterecovery.fabrics.azure_arm import Arm
from siterecovery.fabrics.azure_diff import PROBE_PREFIX, DiffChoice, self_test
from siterecovery.fabrics.base import CloudOrigin, DiskSpec, IpMode, MachineSpec, Nic, OsType, PowerState

MiB = 1 << 20


@dataclass
class Site:
    fabric: AzureFabric
    arm: Arm
    replicas: ContainerClient


def write_replica(replicas: ContainerClient, name: str, size: int, ranges: list[tuple[int, int]]) -> str:
    """A replica page blob (what the master target writes) with random data in `ranges`; its digest."""
    model = bytearray(size)
    writer = PageBlobWriter(replicas.get_blob_client(name), size)
    for off, length in ranges:
        data = os.urandom(length)
        writer.write(off, data)
        model[off : off + length] = data
    writer.flush()
    return xxhash.xxh3_128_hexdigest(model)


def disk_digest(arm: Arm, disk_name: str, size: int) -> str:
    """The managed disk's content, read the way failback reads it: through a read-only SAS."""
    url = arm.disk_read_url(disk_name, 600)
    try:
        return xxhash.xxh3_128_hexdigest(
            BlobClient.from_blob_url(url, api_version=STORAGE_API_VERSION)
            .download_blob(offset=0, length=size)
            .readall()
        )
    finally:
        arm.end_disk_read(disk_name)


def failover(site: Site) -> tuple[str, dict[str, str]]:
    """A failover's VM from two replica page blobs; returns its name and each disk label's digest."""
    tag = uuid.uuid4().hex[:8]
    os_blob, data_blob = f"case-{tag}-os.vhd", f"case-{tag}-data.vhd"
    digests = {
        "os": write_replica(site.replicas, os_blob, 8 * MiB, [(0, 1 * MiB), (5 * MiB, 64 * 1024)]),
        "data": write_replica(site.replicas, data_blob, 4 * MiB, [(3 * MiB, 1 * MiB)]),
    }
    name = f"sr-case-{tag}"
    site.fabric.create_machine(
        MachineSpec(
            name=name,
            host="",
            datastore="",
            os_type=OsType.LINUX,
            disks=(DiskSpec("os", 8 * MiB, os_blob), DiskSpec("data", 4 * MiB, data_blob)),
            nics=(Nic("nic0", "", IpMode.STATIC, "10.1.0.50"),),
        )
    )
    return name, digests


def case_failover_creates_the_vm_on_disks_imported_from_the_replicas(
    site: Site, name: str, digests: dict[str, str]
) -> None:
    inv = site.fabric.discover()
    assert inv.resource_groups[0].name == site.arm.resource_group
    vm = inv.machine(name)
    assert vm is not None
    assert vm.origin is CloudOrigin.FAILOVER
    assert vm.power_state is PowerState.ON
    assert vm.os_type is OsType.LINUX
    assert [d.size_bytes for d in vm.disks] == [8 * MiB, 4 * MiB]
    assert [(n.ip_mode, n.address) for n in vm.nics] == [(IpMode.STATIC, "10.1.0.50")]
    assert [disk_digest(site.arm, d.label, d.size_bytes) for d in vm.disks] == [
        digests["os"],
        digests["data"],
    ]


def case_snapshot_revert_and_remove(site: Site, name: str, digests: dict[str, str]) -> None:
    site.fabric.power_off(name)
    before = site.fabric.discover().machine(name)
    assert before is not None and before.power_state is PowerState.OFF
    snap = site.fabric.create_snapshot(name, "before-boot")
    site.fabric.revert_to_snapshot(name, snap.id)
    after = site.fabric.discover().machine(name)
    assert after is not None
    # New disks, made from the snapshots, with the same content; the old ones are gone.
    assert {d.uuid for d in after.disks}.isdisjoint({d.uuid for d in before.disks})
    assert [disk_digest(site.arm, d.label, d.size_bytes) for d in after.disks] == [
        digests["os"],
        digests["data"],
    ]
    assert not {d.backing for d in before.disks} & {d.id for d in site.arm.list_disks()}
    site.fabric.remove_snapshot(name, snap.id)
    assert not [s for s in site.arm.list_snapshots() if s.name.startswith(snap.id)]


def case_delete_machine_removes_vm_nics_and_disks(site: Site, name: str) -> None:
    vm = site.fabric.discover().machine(name)
    assert vm is not None
    site.fabric.power_off(name)
    site.fabric.delete_machine(name)
    assert site.fabric.discover().machine(name) is None
    assert not {d.backing for d in vm.disks} & {d.id for d in site.arm.list_disks()}
    assert not {n.name for n in vm.nics} & {n.name for n in site.arm.list_nics()}


def case_the_diff_self_test_reaches_a_verdict_and_leaves_no_probe(site: Site) -> DiffChoice:
    """The managed-disk diff's self-test runs through ARM to a verdict (which one depends on the
    endpoint: the caller asserts it) and deletes its probe disk and snapshots."""
    choice = self_test(site.arm)
    assert "could not run" not in choice.reason, choice  # every ARM step of the probe was accepted
    assert not [d.name for d in site.arm.list_disks() if d.name.startswith(PROBE_PREFIX)]
    assert not [s.name for s in site.arm.list_snapshots() if s.name.startswith(PROBE_PREFIX)]
    return choice
