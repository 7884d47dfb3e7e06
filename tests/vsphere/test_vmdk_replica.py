"""Replica disks as VMDKs on a vcsim datastore: the master target writes the very files the
vCenter disk backing names (descriptor + flat extent), through the datastore's local folder."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
from pyVmomi import vim

from siterecovery.dataplane.assignments import AttachedDisk
from siterecovery.dataplane.vmdk import DatastoreMounts
from siterecovery.errors import SiteRecoveryError
from tests.conftest import require_tool
from tests.dataplane.conftest import Plane, one_pair, random_image, wait_for, wait_replicated
from tests.vsphere.conftest import Vcsim, find

MiB = 1 << 20


def test_master_target_writes_the_backing_vmdk_on_the_datastore(
    vcsim: Vcsim, fresh_vm: str, admin_si: Any, plane: Plane
) -> None:
    """RPW-6 data path: qemu-img reads the VMDK vcsim's inventory names, identical to the source."""
    qemu_img, qemu_io = require_tool("qemu-img"), require_tool("qemu-io")
    with vcsim.fabric() as fabric:
        machine = fabric.discover().machine(fresh_vm)
    assert machine is not None
    (disk,) = machine.disks
    mount = Path(find(admin_si, vim.Datastore, disk.datastore).info.url)
    descriptor = mount / disk.backing.split("] ", 1)[1]
    assert descriptor.exists()  # vcsim made the (empty) files its inventory names

    size = disk.size_bytes
    src = random_image(plane.root / "src.img", size, [(0, 3 * MiB), (9 * MiB, 2 * MiB)])
    mt, _, agent = one_pair(plane, src, disk.backing, size, "--datastore", f"{disk.datastore}={mount}")
    sock = plane.root / "nbd" / "d0.sock"
    wait_for(sock.exists, 60, "the NBD export")
    commands = ["-c", "write -P 0x5a 5M 1M", "-c", "write -z 0 512k", "-c", "flush"]
    subprocess.run(
        [qemu_io, "-f", "raw", *commands, f"nbd+unix:///d0?socket={sock}"],
        capture_output=True,
        check=True,
    )
    wait_replicated(agent, mt, "p1")  # type: ignore[arg-type]

    info = subprocess.run([qemu_img, "info", str(descriptor)], capture_output=True, text=True, check=True)
    assert "file format: vmdk" in info.stdout and f"({size} bytes)" in info.stdout
    assert descriptor.with_name(descriptor.stem + "-flat.vmdk").stat().st_size == size
    same = subprocess.run(
        [qemu_img, "compare", "-f", "raw", "-F", "vmdk", str(src), str(descriptor)],
        capture_output=True,
        text=True,
    )
    assert same.returncode == 0, same.stdout + same.stderr


def test_datastore_paths_are_placed_or_refused(tmp_path: Path) -> None:
    mounts = DatastoreMounts.parse([f"ds1={tmp_path}"])
    placed = mounts.place(AttachedDisk(pair_id="p", path=Path("[ds1] vm/vm_1.vmdk"), size=MiB))
    assert placed.path == tmp_path.resolve() / "vm" / "vm_1-flat.vmdk"
    assert (tmp_path / "vm" / "vm_1.vmdk").read_text().count('VMFS "vm_1-flat.vmdk"') == 1
    # Placing again keeps the descriptor written the first time.
    before = (tmp_path / "vm" / "vm_1.vmdk").read_text()
    assert mounts.place(AttachedDisk(pair_id="p", path=Path("[ds1] vm/vm_1.vmdk"), size=MiB)) == placed
    assert (tmp_path / "vm" / "vm_1.vmdk").read_text() == before
    local = AttachedDisk(pair_id="p", path=tmp_path / "x.img", size=MiB)
    assert mounts.place(local) == local

    (tmp_path / "vm" / "sparse.vmdk").write_text(
        'createType="monolithicSparse"\nRW 2048 SPARSE "sparse.vmdk"\n'
    )
    refused = [
        ("[ds2] vm/vm_1.vmdk", "mt-datastore-not-mounted"),
        ("[ds1] ../escape.vmdk", "mt-vmdk-unsupported"),
        ("[ds1] vm/sparse.vmdk", "mt-vmdk-unsupported"),
    ]
    for path, code in refused:
        with pytest.raises(SiteRecoveryError) as err:
            mounts.place(AttachedDisk(pair_id="p", path=Path(path), size=MiB))
        assert err.value.first.code == code, path
