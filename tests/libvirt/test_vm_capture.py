"""A real VM guest (the lab's VM guest image, TCG) as a libvirt domain protected, failed over and
reprotected through the real data path: agent, process server and master target processes.

Capture option (a) of docs/libvirt.md: protecting a stopped domain rewrites its disk source to the
agent's NBD export over a Unix socket at once (`set_disk_sources` answers True); the guest writes
fsync'd files through libvirt's QEMU into the export, the master target writes the replica volume
in the second site's directory pool; a kill -9 of the agent under the running domain followed by a
hard power-off keeps every flushed file on both, once the restarted agent has caught up (the VM
guest's host-side ext4 oracle). Failover defines the recovery domain from the
recorded XML on the replica volume (same MAC, the recovery network); its guest boots clean, writes
more, and a delta resync onto the original domain's volume sends only what changed (measured);
a deleted original domain is recreated from its recorded XML on a new volume.
"""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from siterecovery.lab.vm.fs_oracle import verify_fs_image
from siterecovery.lab.vm.image import ensure_image
from tests.dataplane.conftest import (
    Component,
    Plane,
    pair_stats,
    replication,
    wait_for,
    wait_replicated,
)
from tests.libvirt.conftest import Sites
from tests.libvirt.daemon import PREFIX

pytestmark = pytest.mark.vm
MiB = 1 << 20
BOOT_TIMEOUT = 240.0  # TCG on two shared cores; a boot normally takes seconds


def guest_xml(name: str, kernel: Path, initrd: Path, disk: str, network: str, console: Path) -> str:
    # QEMU runs as root for this domain (a static DAC label): the export's socket is root's.
    # The kernel's command line is the lab's (image.qemu_command): cryptomgr.notests spares the
    # crypto self-tests, about a second of every TCG boot.
    cmdline = "console=ttyS0 quiet loglevel=3 panic=-1 cryptomgr.notests"
    cmdline += f" sr.machine={name} sr.rate=8 sr.mode=log"
    return f"""<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>128</memory><vcpu>1</vcpu>
  <os><type arch='x86_64' machine='q35'>hvm</type><kernel>{kernel}</kernel><initrd>{initrd}</initrd>
    <cmdline>{cmdline}</cmdline></os>
  <cpu mode='custom'><model>qemu64</model></cpu>
  <on_poweroff>destroy</on_poweroff><on_reboot>destroy</on_reboot><on_crash>destroy</on_crash>
  <devices>
    <disk type='file' device='disk'><driver name='qemu' type='raw' cache='none'/><source file='{disk}'/>
      <target dev='vda' bus='virtio'/></disk>
    <interface type='network'><mac address='52:54:00:5e:00:07'/><source network='{network}'/>
      <model type='virtio'/></interface>
    <serial type='file'><source path='{console}'/><target port='0'/></serial>
  </devices>
  <seclabel type='static' model='dac' relabel='no'><label>+0:+0</label></seclabel>
</domain>"""


def wait_console(path: Path, pattern: str, timeout: float = BOOT_TIMEOUT) -> re.Match[str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = path.read_text(errors="replace") if path.exists() else ""
        found = list(re.finditer(pattern, text))
        if found:
            return found[-1]
        if "SR FAIL" in text:
            raise AssertionError(f"the guest failed: {text[-1500:]}")
        time.sleep(0.5)
    raise AssertionError(
        f"no {pattern!r} on the console in {timeout} s: {path.read_text()[-1500:] if path.exists() else ''}"
    )


def guest(fabric_dir: Path) -> tuple[Path, Path]:
    """The VM guest's kernel and initrd where QEMU (libvirt-qemu or root) can read them."""
    image = ensure_image()
    boot = fabric_dir / "boot"
    boot.mkdir(exist_ok=True)
    boot.chmod(0o755)
    return Path(shutil.copy(image.kernel, boot)), Path(shutil.copy(image.initrd, boot))


def wait_flushed(console: Path, at_least: int) -> int:
    deadline = time.monotonic() + BOOT_TIMEOUT
    while True:
        flushed = int(wait_console(console, r"SR FLUSHED (\d+)")[1])
        if flushed >= at_least or time.monotonic() > deadline:
            return flushed
        time.sleep(0.5)


def pipeline(plane: Plane, name: str, source: str, target: str, mode: str) -> tuple[Component, Component]:
    """The real agent exporting `source` as vda, a process server, and a master target writing `target`."""
    # The master target takes the pair only from the process server assigned to it (issue 13).
    disk = {"pair_id": name, "path": target, "size": 48 * MiB, "process_server": f"ps-{name}"}
    mt = plane.master_target([disk], name=f"mt-{name}").start()
    ps = plane.process_server(name=f"ps-{name}").start()
    rep = replication(name, "vda", ps.wait_address(), mt.wait_address(), mode)
    agent = plane.agent([rep], {"vda": Path(source)}, f"agent-{name}").start()
    return agent, mt


def test_protect_failover_reprotect_a_libvirt_domain_through_the_real_data_path(
    sites: Sites, plane: Plane
) -> None:
    kernel, initrd = guest(sites.folder)
    fabric = sites.fabric()
    pool_a, pool_b = f"{PREFIX}a", f"{PREFIX}b"
    volume = fabric.create_volume(fabric.pool(pool_a), f"{PREFIX}vm_vda.img", 48 * MiB, "raw")
    replica = fabric.create_volume(fabric.pool(pool_b), f"{PREFIX}vm-dr_vda.img", 48 * MiB, "raw")
    name = f"{PREFIX}vm"
    console = sites.folder / "vm-console.log"
    fabric.define(guest_xml(name, kernel, initrd, volume, sites.networks[0], console))
    recorded = fabric.xml(name)  # what protection records: the domain's own definition

    # Protection: the agent exports the domain's volume; the stopped domain's disk becomes the
    # export at once; the master target writes the replica volume in the other site's pool.
    agent, mt = pipeline(plane, "fwd", volume, replica, "full")
    sock = plane.root / "nbd" / "vda.sock"
    wait_for(sock.exists, 60, "the agent's export")
    assert fabric.set_disk_sources(name, {"vda": f"nbd+unix://vda@{sock}"}) is True
    assert f"socket='{sock}'" in fabric.xml(name).replace('"', "'")  # QEMU's disk is the export
    # Discovery still names the disk by the volume under the export (what DR moves and attaches).
    (disk,) = fabric.discover().machine(name).disks  # type: ignore[union-attr]
    assert (disk.backing, disk.uuid, disk.datastore, disk.bus) == (volume, volume, pool_a, "virtio")
    assert disk.size_bytes == 48 * MiB
    fabric.power_on(name)
    assert wait_flushed(console, 6) >= 6
    # kill -9 of the agent under the running domain: QEMU's disk is gone mid-write (libvirt 9 has
    # no NBD reconnect), then the domain is stopped hard. A FLUSHED line means fsync returned, so
    # every file it counts was acknowledged by the agent before the kill.
    agent.kill(signal.SIGKILL)
    fabric.power_off(name)
    flushed = int(wait_console(console, r"SR FLUSHED (\d+)")[1])
    agent.start()  # the restarted agent resumes the pair and sends what the kill left unsent
    wait_replicated(agent, mt, "fwd")
    for image in (Path(volume), Path(replica)):
        verdict, fs = verify_fs_image(image, name)
        assert verdict.ok and fs.clean and verdict.records >= flushed, (image, verdict.reason)
    agent.kill()
    mt.kill()

    # Failover: the recovery domain from the recorded XML on the replica volume, same MAC, the
    # recovery site's network; its guest finds a clean file system with every flushed file.
    # The recovery domain's file console is its own, beside the original's (NAME.FILE).
    dr_console = sites.folder / f"{PREFIX}vm-dr.{console.name}"
    dr = fabric.define_recovery(
        recorded,
        f"{PREFIX}vm-dr",
        {"vda": replica},
        {sites.networks[0]: sites.networks[1]},
    )
    assert [d.backing for d in dr.disks] == [replica] and dr.disks[0].datastore == pool_b
    assert [(n.mac, n.network) for n in dr.nics] == [("52:54:00:5e:00:07", sites.networks[1])]
    fabric.power_on(dr.name)
    seen = wait_console(dr_console, r"SR VERDICT ok=(\d) records=(\d+)")
    assert seen[1] == "1" and int(seen[2]) >= flushed, seen[0]
    written = wait_flushed(dr_console, int(seen[2]) + 4)
    fabric.power_off(dr.name)

    # Reprotect: a delta from the replica back onto the original domain's volume sends only what
    # the recovery domain changed; the original volume then passes the oracle with its files.
    back, mt_back = pipeline(plane, "back", replica, volume, "delta")
    wait_replicated(back, mt_back, "back")
    sent = int(pair_stats(back, "back")["bytes_sent"])  # type: ignore[call-overload]
    same = subprocess.run(
        ["qemu-img", "compare", "-f", "raw", "-F", "raw", volume, replica], capture_output=True
    )
    assert same.returncode == 0, same.stdout
    assert sent < 8 * MiB, f"{sent} bytes sent to reprotect a 48 MiB disk"  # the delta, not the disk
    print(f"reprotect delta: {sent} bytes sent for {written - flushed} new files on a 48 MiB disk")
    verdict, fs = verify_fs_image(Path(volume), name)
    assert verdict.ok and fs.clean and verdict.records >= written, verdict.reason
    back.kill()
    mt_back.kill()

    # A deleted original domain: recreated from its recorded XML on a new volume in the chosen
    # pool, after a full sync from the replica. (Its old volume was the agent's, so it stays.)
    fabric.delete_machine(name)
    assert fabric.discover().machine(name) is None
    fresh = fabric.create_volume(fabric.pool(pool_a), f"{PREFIX}vm-new_vda.img", 48 * MiB, "raw")
    full, mt_full = pipeline(plane, "full", replica, fresh, "full")
    wait_replicated(full, mt_full, "full")
    again = fabric.define_recovery(recorded, name, {"vda": fresh})
    assert [d.backing for d in again.disks] == [fresh] and again.disks[0].datastore == pool_a
    assert [n.mac for n in again.nics] == ["52:54:00:5e:00:07"]
    verdict, fs = verify_fs_image(Path(fresh), name)
    assert verdict.ok and fs.clean and verdict.records >= written, verdict.reason
    fabric.close()
