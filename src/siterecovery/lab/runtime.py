"""Running lab machines: the processes behind a powered-on machine, and their control.

A powered-on lab machine is two detached processes whose pids live in
`lab_dir/run/<site>/<machine>/`: its agent's NBD exports of the machine's disks (`nbd/<label>.sock`), and
its guest writing the self-verifying log through that export. The site is part of the path because
a failed-over machine keeps its name in the cloud. Pid files hold the process start time as well,
so a recycled pid is never signalled.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from siterecovery.fabrics.base import FabricError, Machine
from siterecovery.fabrics.lab_model import Accel, GuestKind
from siterecovery.lab.guest import GuestState, GuestStatus, read_status
from siterecovery.lab.vm.image import ensure_image, resolve_accel

NBD_DIR = "nbd"
GUEST_STATUS = "guest.json"
GUEST_KIND = "guest-kind"
_START_TIMEOUT = 15.0
_STOP_TIMEOUT = 10.0
# A VM guest shuts down through its console (writer ends, unmount, poweroff) and may first have to
# finish booting (journal replay, e2fsck): under TCG on a busy machine that takes a while.
_VM_STOP_TIMEOUT = 120.0


def run_dir(lab_dir: Path, site: str, machine: str) -> Path:
    return Path(lab_dir) / "run" / site / machine


def agent_socket(run: Path, label: str) -> Path:
    """Where the machine's agent serves one disk: a Unix socket per disk, the export named by its label."""
    return run / NBD_DIR / f"{label}.sock"


@dataclass(frozen=True)
class AgentSettings:
    """How a site's machines run their mobility agent: the configuration server it registers with."""

    site: str
    server: str = ""  # empty: no agent registration, the disks are only exported
    passphrase_file: str = ""
    registration_delay: float = 2.0  # AG-1: seconds after power-on before the agent registers
    drain_timeout: float = 30.0


def agent_command(
    machine: Machine, run: Path, agent: AgentSettings | None = None, *, lab_dir: Path | None = None
) -> list[str]:
    """The command that starts `machine`'s agent: the real mobility agent when the site names a
    configuration server, else a plain export of its disks. With `lab_dir`, the agent's freeze and
    thaw hooks quiesce and thaw the machine's guest (`siterecovery lab quiesce|thaw`)."""
    disks = [arg for d in machine.disks for arg in ("--disk", f"{d.label}={d.backing}")]
    if agent is None or not agent.server:
        return [sys.executable, "-m", "siterecovery.lab.export", "--unix-dir", str(run / NBD_DIR), *disks]
    hooks: list[str] = []
    if lab_dir is not None:
        for action, option in (("quiesce", "--freeze-hook"), ("thaw", "--thaw-hook")):
            cmd = [sys.executable, "-m", "siterecovery", "lab", action, str(lab_dir), machine.name,
                   "--site", agent.site]  # fmt: skip
            hooks += [option, shlex.join(cmd)]
    return [
        sys.executable, "-m", "siterecovery", "agent",
        "--machine", machine.name, "--site", agent.site,
        "--server", agent.server, "--passphrase-file", agent.passphrase_file,
        "--registration-delay", str(agent.registration_delay),
        "--drain-timeout", str(agent.drain_timeout),
        "--state-dir", str(run / "agent"), "--nbd-unix-dir", str(run / NBD_DIR),
        "--interval", "0.5",
        *hooks,
        *disks,
    ]  # fmt: skip


def guest_command(
    machine: Machine,
    nbd_unix_dir: Path,
    *,
    rate: float = 64.0,
    after: Path | None = None,
    log_owner: str = "",
) -> list[str]:
    """The guest workload writing its log on the machine's first disk."""
    cmd = [
        sys.executable,
        "-m",
        "siterecovery.lab.guest",
        "--unix",
        str(agent_socket(nbd_unix_dir, machine.disks[0].label)),
        "--export",
        machine.disks[0].label,
        "--machine",
        log_owner or machine.name,  # the log belongs to the machine by name, which failover and failback keep
        "--status",
        str(nbd_unix_dir / GUEST_STATUS),
        "--rate",
        str(rate),
    ]
    return [*cmd, "--after", str(after)] if after is not None else cmd


def vm_guest_command(
    machine: Machine, run: Path, *, rate: float = 16.0, log_owner: str = "", accel: Accel = Accel.AUTO
) -> list[str]:
    """A real VM as the guest (siterecovery.lab.vm): the image is built and KVM probed on first use."""
    image = ensure_image()
    return [
        sys.executable, "-m", "siterecovery.lab.vm.guest",
        "--unix", str(agent_socket(run, machine.disks[0].label)),
        "--export", machine.disks[0].label,
        "--machine", log_owner or machine.name,
        "--status", str(run / GUEST_STATUS),
        "--kernel", str(image.kernel), "--initrd", str(image.initrd),
        "--accel", resolve_accel(image, accel).value,
        "--rate", str(rate),
    ]  # fmt: skip


# ---- pid files ---------------------------------------------------------------------------------


def _start_time(pid: int) -> str | None:
    """The kernel's start time of `pid` (None if it is gone or a zombie)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    return None if fields[0] in ("Z", "X") else fields[19]


def _reap(pid: int) -> None:
    # A process we started ourselves (tests, the server) stays a zombie until its parent waits.
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


def _live_pid(pidfile: Path) -> int | None:
    try:
        raw_pid, started = pidfile.read_text().split()
    except (FileNotFoundError, ValueError):
        return None
    pid = int(raw_pid)
    _reap(pid)
    return pid if _start_time(pid) == started else None


def _spawn(cmd: list[str], pidfile: Path, logfile: Path) -> int:
    with open(logfile, "ab") as log:
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            close_fds=True,
        )
    pidfile.write_text(f"{proc.pid} {_start_time(proc.pid)}")
    # The process outlives this object on purpose; forget it without a ResourceWarning.
    proc.returncode = 0
    return proc.pid


def _signal_and_wait(pidfile: Path, sig: signal.Signals, timeout: float) -> bool:
    """Send `sig` and wait for the process to end; True if it ended (or was not running)."""
    pid = _live_pid(pidfile)
    if pid is None:
        pidfile.unlink(missing_ok=True)
        return True
    os.kill(pid, sig)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _live_pid(pidfile) is None:
            pidfile.unlink(missing_ok=True)
            return True
        time.sleep(0.02)
    return False


def _stop(pidfile: Path, timeout: float = _STOP_TIMEOUT) -> None:
    if not _signal_and_wait(pidfile, signal.SIGTERM, timeout):
        _signal_and_wait(pidfile, signal.SIGKILL, _STOP_TIMEOUT)


def _log_tail(path: Path) -> str:
    try:
        return path.read_text(errors="replace")[-800:]
    except FileNotFoundError:
        return ""


def _wait_connectable(sock_path: Path, pidfile: Path, logfile: Path) -> None:
    deadline = time.monotonic() + _START_TIMEOUT
    while time.monotonic() < deadline:
        if _live_pid(pidfile) is None:
            break
        with socket.socket(socket.AF_UNIX) as s:
            try:
                s.connect(str(sock_path))
                return
            except OSError:
                time.sleep(0.02)
    raise FabricError(
        "machine-start-failed",
        f"The agent export at {sock_path} did not start: {_log_tail(logfile)}",
        "Read the log above, fix the cause and power on again.",
    )


# ---- machine control ---------------------------------------------------------------------------


def start_machine(
    lab_dir: Path,
    site: str,
    machine: Machine,
    *,
    rate: float = 64.0,
    after: Path | None = None,
    agent: AgentSettings | None = None,
    log_owner: str = "",
    guest: GuestKind = GuestKind.PYTHON,
    accel: Accel = Accel.AUTO,
) -> None:
    """Start whatever of the machine's agent and guest is not running (idempotent)."""
    run = run_dir(lab_dir, site, machine.name)
    run.mkdir(parents=True, exist_ok=True)
    if not machine.disks:
        return
    cmd: list[str] = []
    if _live_pid(run / "guest.pid") is None:
        # First, so a VM guest that cannot be built fails the power-on before anything starts.
        if guest is GuestKind.VM:
            cmd = vm_guest_command(machine, run, rate=rate, log_owner=log_owner, accel=accel)
        else:
            cmd = guest_command(machine, run, rate=rate, after=after, log_owner=log_owner)
    if _live_pid(run / "export.pid") is None:
        for d in machine.disks:
            agent_socket(run, d.label).unlink(missing_ok=True)
        (run / "agent-drain-timeout").write_text(str(agent.drain_timeout if agent else 0.0))
        _spawn(
            agent_command(machine, run, agent, lab_dir=Path(lab_dir).resolve()),
            run / "export.pid",
            run / "export.log",
        )
        for d in machine.disks:
            _wait_connectable(agent_socket(run, d.label), run / "export.pid", run / "export.log")
    if cmd:
        (run / GUEST_STATUS).unlink(missing_ok=True)
        (run / GUEST_KIND).write_text(guest.value)
        _spawn(cmd, run / "guest.pid", run / "guest.log")


def stop_machine(lab_dir: Path, site: str, machine: str) -> None:
    """Shut the guest down cleanly (it flushes), then the export."""
    run = run_dir(lab_dir, site, machine)
    _stop(run / "guest.pid", _VM_STOP_TIMEOUT if _guest_kind(run) is GuestKind.VM else _STOP_TIMEOUT)
    # The agent drains what it captured to its process server before it exits: give it that time.
    try:
        drain = float((run / "agent-drain-timeout").read_text())
    except (FileNotFoundError, ValueError):
        drain = 0.0
    _stop(run / "export.pid", _STOP_TIMEOUT + drain)
    for sock in (run / NBD_DIR).glob("*.sock"):
        sock.unlink(missing_ok=True)


def _guest_kind(run: Path) -> GuestKind:
    try:
        return GuestKind((run / GUEST_KIND).read_text().strip())
    except (FileNotFoundError, ValueError):
        return GuestKind.PYTHON


def crash_guest(lab_dir: Path, site: str, machine: str) -> bool:
    """kill -9 the guest (a VM guest's QEMU first); False if it was not running."""
    run = run_dir(lab_dir, site, machine)
    pidfile = run / "guest.pid"
    if _live_pid(pidfile) is None:
        return False
    _signal_and_wait(run / "qemu.pid", signal.SIGKILL, _STOP_TIMEOUT)
    _signal_and_wait(pidfile, signal.SIGKILL, _STOP_TIMEOUT)
    return True


def export_running(lab_dir: Path, site: str, machine: str) -> bool:
    return _live_pid(run_dir(lab_dir, site, machine) / "export.pid") is not None


def guest_running(lab_dir: Path, site: str, machine: str) -> bool:
    return _live_pid(run_dir(lab_dir, site, machine) / "guest.pid") is not None


def guest_status(lab_dir: Path, site: str, machine: str) -> GuestStatus | None:
    return read_status(run_dir(lab_dir, site, machine) / GUEST_STATUS)


def _await_state(lab_dir: Path, site: str, machine: str, wanted: GuestState, timeout: float) -> GuestStatus:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = guest_status(lab_dir, site, machine)
        if status is not None and status.state is wanted:
            return status
        if not guest_running(lab_dir, site, machine):
            break
        time.sleep(0.02)
    raise FabricError(
        "guest-not-responding",
        f"The guest of {machine} did not become {wanted}.",
        f"Check {run_dir(lab_dir, site, machine) / 'guest.log'} and power the machine on.",
    )


def _signal_guest(lab_dir: Path, site: str, machine: str, sig: signal.Signals) -> None:
    pid = _live_pid(run_dir(lab_dir, site, machine) / "guest.pid")
    if pid is None:
        raise FabricError(
            "guest-not-running", f"Machine {machine} has no running guest.", f"Power {machine} on first."
        )
    os.kill(pid, sig)


def quiesce(lab_dir: Path, site: str, machine: str, timeout: float = 30.0) -> int:
    """Freeze the guest (the agent's freeze hook); returns the quiesce marker's sequence number."""
    status = guest_status(lab_dir, site, machine)
    if status is None or status.state is not GuestState.QUIESCED:
        _signal_guest(lab_dir, site, machine, signal.SIGUSR1)
        status = _await_state(lab_dir, site, machine, GuestState.QUIESCED, timeout)
    return status.quiesce_seq or status.seq


def thaw(lab_dir: Path, site: str, machine: str, timeout: float = 30.0) -> None:
    """Let a frozen guest write again."""
    _signal_guest(lab_dir, site, machine, signal.SIGUSR2)
    _await_state(lab_dir, site, machine, GuestState.RUNNING, timeout)


def stop_all(lab_dir: Path) -> None:
    """Stop every machine process of a lab (used when tearing a lab down)."""
    root = Path(lab_dir) / "run"
    if not root.is_dir():
        return
    for site in root.iterdir():
        for machine in site.iterdir() if site.is_dir() else ():
            stop_machine(lab_dir, site.name, machine.name)
