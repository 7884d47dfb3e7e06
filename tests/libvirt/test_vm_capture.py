"""A real VM guest (the lab's VM guest image, TCG) as a libvirt domain whose disk is the agent's NBD
export over a Unix socket, then a recovery domain defined from its recorded XML in the other pool.

Capture option (a) of docs/libvirt.md: protecting a stopped domain rewrites its disk source to the
export at once (`set_disk_sources` answers True); the guest writes fsync'd files through libvirt's
QEMU into the export; a hard power-off (a crash) keeps every flushed file (the host-side ext4
oracle of the VM guest checks the volume). The volume copied to the second site's pool stands for
the replica; the recovery domain keeps the domain's interface (same MAC) on the recovery network
and its guest finds a clean file system holding the same files.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from siterecovery.fabrics import libvirt_xml as lx
from siterecovery.fabrics.base import PowerState
from siterecovery.lab.vm.fs_oracle import verify_fs_image
from siterecovery.lab.vm.image import ensure_image
from tests.libvirt.conftest import Sites
from tests.libvirt.daemon import PREFIX

pytestmark = pytest.mark.vm
MiB = 1 << 20
BOOT_TIMEOUT = 240.0  # TCG on two shared cores; a boot normally takes seconds


def guest_xml(name: str, kernel: Path, initrd: Path, disk: str, network: str, console: Path) -> str:
    # QEMU runs as root for this domain (a static DAC label): the export's socket is root's.
    return f"""<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>128</memory><vcpu>1</vcpu>
  <os><type arch='x86_64' machine='q35'>hvm</type><kernel>{kernel}</kernel><initrd>{initrd}</initrd>
    <cmdline>console=ttyS0 quiet loglevel=3 panic=-1 sr.machine={name} sr.rate=8 sr.mode=log</cmdline></os>
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


def test_a_domain_on_the_agents_export_survives_a_crash_and_recovers_from_its_recorded_xml(
    sites: Sites,
) -> None:
    image = ensure_image()
    boot = sites.folder / "boot"
    boot.mkdir(exist_ok=True)
    boot.chmod(0o755)
    kernel, initrd = Path(shutil.copy(image.kernel, boot)), Path(shutil.copy(image.initrd, boot))
    fabric = sites.fabric()
    pool_a, pool_b = f"{PREFIX}a", f"{PREFIX}b"
    volume = fabric.create_volume(fabric.pool(pool_a), f"{PREFIX}vm_vda.img", 48 * MiB, "raw")
    name = f"{PREFIX}vm"
    console = sites.folder / "vm-console.log"
    fabric.define(guest_xml(name, kernel, initrd, volume, sites.networks[0], console))
    recorded = fabric.xml(name)

    nbd = sites.folder / "nbd"
    export = subprocess.Popen(
        [sys.executable, "-m", "siterecovery.lab.export", "--unix-dir", str(nbd), "--disk", f"vda={volume}"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert export.stdout is not None and "serving vda" in export.stdout.readline()
        sock = nbd / "vda.sock"
        # Protection: the stopped domain's disk becomes the export at once.
        assert fabric.set_disk_sources(name, {"vda": f"nbd+unix://vda@{sock}"}) is True
        (disk,) = fabric.discover().machine(name).disks  # type: ignore[union-attr]
        assert disk.backing == f"nbd+unix://vda@{sock}" and disk.bus == "virtio"
        fabric.power_on(name)
        assert fabric.discover().machine(name).power_state is PowerState.ON  # type: ignore[union-attr]
        flushed = int(wait_console(console, r"SR FLUSHED (\d+)")[1])
        deadline = time.monotonic() + BOOT_TIMEOUT
        while flushed < 6 and time.monotonic() < deadline:
            flushed = int(wait_console(console, r"SR FLUSHED (\d+)")[1])
            time.sleep(0.5)
        assert flushed >= 6
        fabric.power_off(name)  # a hard stop: the crash
    finally:
        export.terminate()
        export.wait(timeout=60)
    verdict, fs = verify_fs_image(Path(volume), name)
    assert verdict.ok and fs.clean, verdict.reason
    assert verdict.records >= flushed  # every file the guest had fsync'd is there

    # The second site: the volume's copy in pool b stands for the replica the master target wrote.
    replica = sites.pools[pool_b] / f"{PREFIX}vm-dr_vda.img"
    subprocess.run(["cp", "--sparse=always", volume, str(replica)], check=True, timeout=120)
    fabric.pool(pool_b).refresh(0)
    dr_console = sites.folder / "vm-dr-console.log"
    dr_xml = recorded.replace(str(console), str(dr_console))
    dr = fabric.define_recovery(
        dr_xml, f"{PREFIX}vm-dr", {"vda": str(replica)}, {sites.networks[0]: sites.networks[1]}
    )
    assert [d.backing for d in dr.disks] == [str(replica)] and dr.disks[0].datastore == pool_b
    assert [(n.mac, n.network) for n in dr.nics] == [("52:54:00:5e:00:07", sites.networks[1])]
    assert dr.id != fabric.discover().machine(name).id  # type: ignore[union-attr]
    fabric.power_on(dr.name)
    seen = wait_console(dr_console, r"SR VERDICT ok=(\d) records=(\d+)")
    assert seen[1] == "1" and int(seen[2]) >= flushed, seen[0]
    fabric.power_off(dr.name)
    assert lx.disk_sources(lx.parse(fabric.xml(dr.name)))[0].path == str(replica)
    fabric.close()
