"""The lab's VM guest as a libvirt domain's own crash-consistency oracle (`GuestOracle`).

A domain booting the lab's VM guest image (its kernel command line carries `sr.machine=`) checks
its disk at boot (journal replay, `e2fsck -fn`, its numbered fsync'd files a clean prefix) and
reports on its serial console, as it does under the lab's QEMU: `SR VERDICT …` once per boot,
`SR FLUSHED n` after each durable file. When that console is a file (`<serial type='file'>`) on
this host, `LibvirtGuestFabric` (the libvirt fabric the configuration server opens) reads it
with the lab's own console parser (`lab.vm.guest.Console`), so the DR jobs record the same
verdicts after a failover or failback onto libvirt as onto the lab.
Every other domain (a real guest, a console elsewhere, a remote host) is "not observable": the
jobs then skip the verdict instead of waiting for one.

QEMU truncates a file console when the domain starts, so the file holds the current (or last)
boot only; a verdict counts when the file changed after the moment asked about.
"""

from __future__ import annotations

import io
from pathlib import Path

from siterecovery.fabrics import libvirt_xml as lx
from siterecovery.fabrics.libvirt import LibvirtFabric
from siterecovery.lab.guest import GuestState
from siterecovery.lab.vm.guest import Console

MARKER = "sr.machine="


class _Reader(Console):
    """The lab's console parser without its status file: the fabric only reads."""

    def publish(self, state: GuestState | None = None) -> None:
        if state is not None:
            self.status.state = state


def console_path(xml: str) -> Path | None:
    """The file console of a domain that boots the VM guest image, else None."""
    root = lx.parse(xml)
    if MARKER not in root.findtext("./os/cmdline", ""):
        return None
    for tag in ("serial", "console"):
        source = root.find(f"./devices/{tag}[@type='file']/source")
        if source is not None and source.get("path"):
            return Path(source.get("path", ""))
    return None


def not_observable(machine: str) -> dict[str, object]:
    return {
        "ok": True,
        "observable": False,
        "reason": f"domain {machine} reports no guest oracle (not the VM guest image on a file console here)",
    }


def read_console(path: Path, machine: str) -> _Reader:
    reader = _Reader(machine, path, io.BytesIO())
    text = path.read_text(errors="replace") if path.exists() else ""
    for line in text.splitlines():
        reader.line(line)
    return reader


def start_verdict(path: Path, machine: str, since: float) -> dict[str, object] | None:
    """The boot's verdict when the console changed after `since` and holds one."""
    try:
        if path.stat().st_mtime < since:
            return None
    except FileNotFoundError:
        return None
    verdict = read_console(path, machine).status.start_verdict
    return dict(verdict) if verdict else None


def flushed(path: Path, machine: str) -> int:
    """The last file the guest reported durable (its verdict's count when it wrote none since)."""
    return read_console(path, machine).status.flushed


class LibvirtGuestFabric(LibvirtFabric):
    """The libvirt fabric with the VM guest's oracle (`GuestOracle`) for the domains that boot it."""

    def _console(self, machine: str) -> Path | None:
        # Only this host's files can be read; a remote host's guests are not observable from here.
        return console_path(self.xml(machine)) if self.local else None

    def set_log_owner(self, machine: str, owner: str) -> None:
        """Nothing to do: a domain defined from another's recorded XML keeps its kernel command
        line, whose `sr.machine=` already names the log it continues."""

    def guest_flushed(self, machine: str) -> int | None:
        path = self._console(machine)
        return flushed(path, machine) if path is not None else None

    def guest_start_verdict(self, machine: str, since: float) -> dict[str, object] | None:
        path = self._console(machine)
        if path is None:
            return not_observable(machine)
        return start_verdict(path, machine, since)
