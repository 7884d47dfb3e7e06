"""A real libvirtd for the tests: started as root with its sockets in a temporary folder, stopped after.

libvirt runs here without systemd: `virtlogd` first (QEMU's console and log go through it), then
`libvirtd` with a config whose `unix_sock_dir` is the test's folder, so the test talks to its own
daemon over `qemu:///system?socket=…`. Pools and networks the tests make are transient (they end
with the daemon); domains are persistent (failover defines them), so every domain whose name starts
with the test prefix (and any pool or network) is removed at the start and at the end.

A second site as a second libvirtd on the same machine (`private=True`): a privileged libvirtd
keeps its state in fixed places (/run/libvirt, /etc/libvirt, /var/lib/libvirt), where a second one
would adopt the first one's domains, so it runs in a mount namespace of its own (`unshare -m`)
where those three are folders of the test, with a `virtlogd` of its own; its socket is in the
test's folder like the first one's, so the two are two URIs (`qemu:///system?socket=…`).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

import libvirt
from tests.conftest import IN_CI, require_tool

PREFIX = "srtest-"


class Daemon:
    def __init__(self, folder: Path, private: bool = False) -> None:
        self.folder = folder
        self.private = private
        self.sock = folder / "sock"
        self.uri = f"qemu:///system?socket={self.sock}/libvirt-sock"
        self.pids: list[Path] = []

    def start(self) -> None:
        if os.geteuid() != 0:
            if IN_CI:
                pytest.fail("the libvirt tests run libvirtd as root (CI runs as root)")
            pytest.skip("the libvirt tests run libvirtd as root")
        libvirtd = require_tool("libvirtd")
        virtlogd = require_tool("virtlogd")
        self.sock.mkdir(parents=True)
        conf = self.folder / "libvirtd.conf"
        conf.write_text(
            f'unix_sock_dir = "{self.sock}"\nauth_unix_rw = "none"\nauth_unix_ro = "none"\n'
            f'log_outputs = "3:file:{self.folder}/libvirtd.log"\n'
        )
        logconf = self.folder / "virtlogd.conf"
        logconf.write_text(f'log_outputs = "3:file:{self.folder}/virtlogd.log"\n')
        # QEMU domains' logs: libvirtd writes them under /var/log/libvirt/qemu through virtlogd.
        Path("/var/log/libvirt/qemu").mkdir(parents=True, exist_ok=True)
        if self.private:
            self._start_private(virtlogd, logconf, libvirtd, conf)
        elif not Path("/run/libvirt/virtlogd-sock").exists():
            self._spawn(
                [virtlogd, "-d", "-f", str(logconf), "-p", str(self.folder / "virtlogd.pid")], "virtlogd.pid"
            )
        if not self.private:
            self._spawn(
                [libvirtd, "-d", "-f", str(conf), "-p", str(self.folder / "libvirtd.pid")], "libvirtd.pid"
            )
        deadline = time.monotonic() + 60
        while True:
            try:
                libvirt.open(self.uri).close()
                break
            except libvirt.libvirtError:
                if time.monotonic() > deadline:
                    log = (
                        (self.folder / "libvirtd.log").read_text()
                        if (self.folder / "libvirtd.log").exists()
                        else ""
                    )
                    raise AssertionError(f"libvirtd did not answer at {self.uri}: {log[-2000:]}") from None
                time.sleep(0.2)
        self.clean()

    def _start_private(self, virtlogd: str, logconf: Path, libvirtd: str, conf: Path) -> None:
        binds = []
        for system in ("/run/libvirt", "/etc/libvirt", "/var/lib/libvirt"):
            own = self.folder / system.strip("/").replace("/", "-")
            own.mkdir(mode=0o755)
            binds.append(f"mount --bind {own} {system}")
        script = " && ".join([
            *binds,
            f"{virtlogd} -d -f {logconf} -p {self.folder / 'virtlogd.pid'}",
            f"exec {libvirtd} -d -f {conf} -p {self.folder / 'libvirtd.pid'}",
        ])  # fmt: skip
        unshare = require_tool("unshare")
        subprocess.run(
            [unshare, "--mount", "--propagation", "private", "sh", "-c", script], check=True, timeout=60
        )
        self.pids += [self.folder / "virtlogd.pid", self.folder / "libvirtd.pid"]

    def _spawn(self, cmd: list[str], pidfile: str) -> None:
        subprocess.run(cmd, check=True, timeout=60)
        self.pids.append(self.folder / pidfile)

    def clean(self) -> None:
        conn = libvirt.open(self.uri)
        try:
            for dom in conn.listAllDomains(0):
                if not dom.name().startswith(PREFIX):
                    continue
                if dom.isActive():
                    dom.destroy()
                if dom.isPersistent():
                    for snap in dom.listAllSnapshots(0):
                        snap.delete(libvirt.VIR_DOMAIN_SNAPSHOT_DELETE_METADATA_ONLY)
                    dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_NVRAM)
            # Transient pools and networks outlive a daemon restart (libvirt keeps their state in
            # /run): a run killed before its teardown leaves them for the next one to remove.
            for obj in [*conn.listAllStoragePools(0), *conn.listAllNetworks(0)]:
                if obj.name().startswith(PREFIX):
                    persistent = obj.isPersistent()
                    if obj.isActive():
                        obj.destroy()
                    if persistent:
                        obj.undefine()
        finally:
            conn.close()

    def stop(self) -> None:
        with contextlib.suppress(libvirt.libvirtError):
            self.clean()
        for pidfile in reversed(self.pids):
            pid = _running_pidfile(pidfile)
            if pid is None:
                continue
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + 30
            while _alive(pid) and time.monotonic() < deadline:
                time.sleep(0.1)
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().rsplit(")", 1)[-1].split()[0] != "Z"


def _running_pidfile(path: Path) -> int | None:
    try:
        pid = int(path.read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if _alive(pid) else None
