"""A lab machine whose guest is a real Linux VM, driven through the lab CLI: boot, write, kill -9
of QEMU, and the host's own check of the ext4 image (journal replay on a copy, e2fsck -fn, every
fsync'd file whole)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from siterecovery.lab import runtime
from siterecovery.lab.vm.fs_oracle import needs_recovery, verify_fs_image
from tests.conftest import require_tool

from .conftest import Lab


def test_a_vm_lab_needs_disks_for_ext4_and_guest_values_are_checked(tmp_path: Path) -> None:
    lab = Lab(tmp_path / "lab")
    small = lab.cli("create", str(lab.path), "--guest", "vm", "--disk-size", "16M", check=False)
    assert small.returncode == 1 and "disk-too-small" in small.stderr
    lab.cli("create", str(lab.path), "--disk-size", "64M")
    bad = lab.cli("set", str(lab.path), "machine", "web1", "guest=xen", check=False)
    assert bad.returncode == 2 and "python, vm" in bad.stderr


@pytest.mark.vm
def test_vm_guest_killed_mid_write_leaves_a_clean_file_system_with_every_fsynced_file(tmp_path: Path) -> None:
    for tool in ("qemu-system-x86_64", "busybox", "e2fsck", "debugfs"):
        require_tool(tool)
    lab = Lab(tmp_path / "lab")
    lab.cli("create", str(lab.path), "--disk-size", "64M")
    lab.cli("set", str(lab.path), "machine", "web1", "guest=vm")
    try:
        image = json.loads(lab.cli("--output", "json", "image").stdout)  # built on first use, cached
        assert Path(image["folder"], "initrd.img").stat().st_size == image["initrd_bytes"]
        lab.cli("power", str(lab.path), "web1", "on")
        deadline = time.monotonic() + 180  # a TCG boot on a busy machine: generous, event-driven
        while (status := runtime.guest_status(lab.path, "onprem", "web1")) is None or status.flushed < 24:
            assert runtime.guest_running(lab.path, "onprem", "web1"), "the VM guest stopped"
            assert time.monotonic() < deadline, status
            time.sleep(0.1)
        assert status.start_verdict["filesystem"] == {"created": True}
        qemu = int((lab.fabric().run_dir("web1") / "qemu.pid").read_text().split()[0])
        lab.cli("crash", str(lab.path), "web1")
        assert not os.path.exists(f"/proc/{qemu}/stat") or "Z" in Path(f"/proc/{qemu}/stat").read_text()
        flushed = runtime.guest_status(lab.path, "onprem", "web1").flushed  # type: ignore[union-attr]
        assert flushed >= 24

        disk = Path(lab.fabric().discover().machine("web1").disks[0].backing)  # type: ignore[union-attr]
        assert needs_recovery(disk)  # mounted when QEMU died: a crash-consistent image
        verdict, fs = verify_fs_image(disk, "web1")
        assert fs.needed_replay and fs.fsck_rc == 0, fs
        assert verdict.ok and verdict.records >= flushed, (verdict, flushed)
        assert needs_recovery(disk)  # the replay ran on a copy: the image itself is untouched
        shown = json.loads(lab.cli("--output", "json", "verify", str(lab.path), "web1").stdout)
        assert shown["ok"] and shown["records"] == verdict.records, shown
    finally:
        runtime.stop_all(lab.path)
