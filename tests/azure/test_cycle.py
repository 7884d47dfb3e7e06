"""A DR cycle between an on-premises disk and the Azure site (FakeArm + Azurite storage), an oracle at
each move: protect (agent → process server → master target writing page blobs, real processes),
planned failover (managed disks imported from the replicas, a base snapshot, the VM), the recovery VM
writing, agentless failback (only the ranges changed since the base, read over SAS), and commit."""

from __future__ import annotations

import os
import subprocess

import pytest
import xxhash
from azure.storage.blob import BlobClient

from siterecovery.dataplane.changed_ranges import copy_changes
from siterecovery.dataplane.page_blob import CONNECTION_ENV, STORAGE_API_VERSION, PageBlobWriter, blob_name
from siterecovery.fabrics.azure import FAILOVER_BASE, AzureFabric
from siterecovery.fabrics.base import DiskSpec, MachineSpec, OsType, PowerState
from tests.azure.conftest import Azurite
from tests.azure.fake_arm import FakeArm
from tests.conftest import require_tool
from tests.dataplane.conftest import Plane, random_image, replication, wait_for, wait_replicated

MiB = 1 << 20
SIZE = 16 * MiB


def digest(data: bytes | bytearray) -> str:
    return xxhash.xxh3_128_hexdigest(data)


def test_protect_failover_run_failback_commit(
    azurite: Azurite, plane: Plane, monkeypatch: pytest.MonkeyPatch
) -> None:
    qemu_io = require_tool("qemu-io")
    replicas = azurite.container("replicas")
    arm = FakeArm(azurite.container("disks"))
    fabric = AzureFabric("azure", "cloud", arm, replicas, subnet_id="/subscriptions/0/subnets/recovery")

    # 1. Protect: the on-premises disk reaches a page blob in the replica container.
    disk = random_image(plane.root / "web-d0.img", SIZE, [(0, 4 * MiB), (12 * MiB, 2 * MiB)])
    monkeypatch.setenv(CONNECTION_ENV, azurite.connection_string)
    mt = plane.master_target(
        [{"pair_id": "p1", "path": str(plane.root / "replicas" / "web" / "d0.img"), "size": SIZE}]
    )
    mt.args += ["--page-blob-container", replicas.container_name]
    mt.start()
    ps = plane.process_server().start()
    agent = plane.agent([replication("p1", "d0", ps.wait_address(), mt.wait_address())], {"d0": disk}).start()
    sock = plane.root / "nbd" / "d0.sock"
    wait_for(sock.exists, 60, "the NBD export")
    commands = ["-c", "write -P 0x11 6M 1M", "-c", "write -z 0 256k", "-c", "flush"]
    subprocess.run(
        [qemu_io, "-f", "raw", *commands, f"nbd+unix:///d0?socket={sock}"], check=True, capture_output=True
    )
    wait_replicated(agent, mt, "p1")  # type: ignore[arg-type]
    at_failover = disk.read_bytes()
    target = plane.root / "replicas" / "web" / "d0.img"  # the item's cloud_path for the disk
    replica = replicas.get_blob_client(blob_name(target)).download_blob(offset=0, length=SIZE).readall()
    assert digest(replica) == digest(at_failover)  # oracle: the replica is the source

    # 2. Planned failover: the source is shut down (everything was applied), replication stops.
    plane.stop_all()
    fabric.create_machine(
        MachineSpec(
            name="web",
            host="",
            datastore="",
            os_type=OsType.LINUX,
            disks=(DiskSpec("d0", SIZE, str(target)),),
        )
    )
    vm = fabric.discover().machine("web")
    assert vm is not None and vm.power_state is PowerState.ON
    (os_disk,) = vm.disks
    url = arm.disk_read_url(os_disk.label, 600)
    assert digest(_read(url, SIZE)) == digest(at_failover)  # oracle: the recovery VM boots the failover point
    arm.end_disk_read(os_disk.label)
    assert [s.name for s in arm.list_snapshots()] == [f"web-{FAILOVER_BASE}-os"]

    # 3. The recovery VM runs and writes: two updates and a trim (the fake's disks are page blobs).
    running = bytearray(at_failover)
    guest = PageBlobWriter(arm.blobs.get_blob_client(os_disk.label), SIZE)
    updates = [(2 * MiB + 4096, os.urandom(8192)), (13 * MiB, os.urandom(64 * 1024))]
    for off, data in updates:
        guest.write(off, data)
        running[off : off + len(data)] = data
    guest.zero(12 * MiB, 512 * 1024)
    running[12 * MiB : 12 * MiB + 512 * 1024] = bytes(512 * 1024)
    guest.flush()

    # 4. Agentless failback: only what changed since the base snapshot goes back on premises.
    fabric.power_off("web")
    with fabric.failback_changes("web") as disks:
        (changed,) = disks
        assert [(r.offset, r.length, r.cleared) for r in changed.changes] == [
            (2 * MiB + 4096, 8192, False),
            (12 * MiB, 512 * 1024, True),
            (13 * MiB, 64 * 1024, False),
        ]
        moved = copy_changes(changed.source, changed.changes, disk)
    assert not arm.read_grants  # read access revoked after the failback read
    assert moved == 8192 + 64 * 1024  # the trim is punched, not read
    assert digest(disk.read_bytes()) == digest(running)  # oracle: on premises is the VM's disk now

    # 5. Commit the failback: the Azure VM, its NIC, disks and base snapshot are deleted.
    fabric.delete_machine("web")
    assert fabric.discover().machines == ()
    assert (arm.list_disks(), arm.list_nics(), arm.list_snapshots()) == ([], [], [])


def _read(url: str, size: int) -> bytes:
    return (
        BlobClient.from_blob_url(url, api_version=STORAGE_API_VERSION)
        .download_blob(offset=0, length=size)
        .readall()
    )
