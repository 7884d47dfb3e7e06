"""A lab machine's guest as a real VM: QEMU boots the guest image with the agent's export as its disk.

Started by the lab runtime in place of the Python guest, with the same command line, status file
and signals, so power, crash, failover verdicts and the agent's freeze and thaw hooks work on
either: SIGTERM becomes `stop` on the serial console (the guest ends its writer, unmounts and
powers off), SIGUSR1 `freeze` (a marker file, then `fsfreeze -f`), SIGUSR2 `thaw`. QEMU dies with
this process (PR_SET_PDEATHSIG), and `lab crash` kills QEMU itself with SIGKILL. The guest's
reports on the console (see init.sh) become `guest.json`: FLUSHED lines the flushed count, the
VERDICT line with the file-system checks the start verdict. The raw console goes to console.log.

    python -m siterecovery.lab.vm.guest --unix SOCKET --export LABEL --machine ID --status FILE
        --kernel VMLINUZ --initrd INITRD --accel kvm|tcg [--rate FILES_PER_S]
"""

from __future__ import annotations

import argparse
import ctypes
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import FrameType
from typing import IO

from siterecovery.fabrics.lab_model import Accel
from siterecovery.lab.guest import GuestState, GuestStatus, write_status
from siterecovery.lab.vm.image import nbd_drive, qemu_command

QEMU_PID = "qemu.pid"
_PR_SET_PDEATHSIG = 1
_COMMANDS = {signal.SIGTERM: "stop", signal.SIGINT: "stop", signal.SIGUSR1: "freeze", signal.SIGUSR2: "thaw"}


def _die_with_parent() -> None:
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def _start_time(pid: int) -> str:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat[stat.rindex(")") + 2 :].split()[19]


def _fields(words: list[str]) -> dict[str, str]:
    return dict(w.split("=", 1) for w in words if "=" in w)


def _int(text: str, default: int = 0) -> int:
    digits = "".join(c for c in text if c.isdigit())
    return int(digits) if digits else default


class Console:
    """Turns the guest's `SR …` console lines into the lab guest's status file."""

    def __init__(self, machine: str, status_path: Path, send: IO[bytes]) -> None:
        self.machine = machine
        self.status_path = status_path
        self.send = send
        self.listening = False
        self.pending: list[str] = []
        self.fs: dict[str, object] = {}
        self.fsck_findings: list[str] = []
        self.status = GuestStatus(
            pid=os.getpid(), machine=machine, state=GuestState.RUNNING, seq=0, flushed=0,
            start_verdict={}, updated_at=time.time(),
        )  # fmt: skip

    def publish(self, state: GuestState | None = None) -> None:
        if state is not None:
            self.status.state = state
        self.status.updated_at = time.time()
        write_status(self.status_path, self.status)

    def command(self, cmd: str) -> None:
        # Typed before the guest reads its console they could be lost: queue them until LISTENING.
        if not self.listening:
            self.pending.append(cmd)
            return
        try:
            self.send.write(cmd.encode() + b"\n")
            self.send.flush()
        except (BrokenPipeError, ValueError):
            pass

    def verdict(self, kv: dict[str, str]) -> dict[str, object]:
        files_ok = kv.get("ok") == "1"
        records = _int(kv.get("records", "0"))
        fsck = self.fs.get("fsck_rc")
        fs_ok = fsck in (None, 0)  # None: a new file system, nothing to check
        reason = kv.get("reason", "").replace("-", " ")
        if not fs_ok:
            reason = f"e2fsck -fn found errors (exit {fsck}): {'; '.join(self.fsck_findings[:3])}"
        elif reason == "clean":
            reason = f"clean file system; {records} fsync'd files intact"
        elif reason == "empty":
            reason = "new file system" if self.fs.get("created") else "clean file system; no files yet"
        markers = [int(x) for x in kv.get("quiesce", "-").split(",") if x.isdigit()]
        return {
            "ok": files_ok and fs_ok,
            "records": records,
            "first_bad": None if files_ok and fs_ok else _int(kv.get("first_bad", "1"), 1),
            "reason": reason,
            "machine": self.machine,
            "quiesce_markers": markers,
            "torn_tail": kv.get("torn") == "1",
            "files": _int(kv.get("files", "0")),
            "filesystem": dict(self.fs),
        }

    def line(self, line: str) -> None:
        at = line.find("SR ")
        if at < 0:
            return
        words = line[at:].split()
        what, args = (words[1], words[2:]) if len(words) > 1 else ("", [])
        if what == "FLUSHED" and args:
            self.status.seq = self.status.flushed = _int(args[0])
            self.publish()
        elif what == "VERDICT":
            self.status.start_verdict = self.verdict(_fields(args))
            self.status.seq = self.status.flushed = int(str(self.status.start_verdict["records"]))
            self.publish()
        elif what == "PREFSCK":
            kv = _fields(args)
            recovery = kv.get("recovery") == "1"
            self.fs["fsck_before_replay_rc"] = _int(kv.get("rc", "8"), 8)
            self.fs["needed_journal_replay"] = recovery
            self.fs["clean_without_replay"] = not recovery and self.fs["fsck_before_replay_rc"] == 0
        elif what == "FSCK":
            self.fs["fsck_rc"] = _int(_fields(args).get("rc", "8"), 8)
        elif what == "fsck:":
            self.fsck_findings.append(" ".join(args))
        elif what == "MKFS":
            self.fs["created"] = True
        elif what == "LISTENING":
            self.listening = True
            pending, self.pending = self.pending, []
            for cmd in pending:
                self.command(cmd)
        elif what == "QUIESCED" and args:
            self.status.quiesce_seq = _int(args[0])
            self.publish(GuestState.QUIESCED)
        elif what == "THAWED":
            self.publish(GuestState.RUNNING)
        elif what == "FULL":
            self.publish(GuestState.FULL)
        elif what == "FAIL":
            self.status.error = " ".join(args)
            self.publish()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m siterecovery.lab.vm.guest", description=__doc__)
    parser.add_argument("--unix", type=Path, required=True, help="the machine's NBD socket")
    parser.add_argument("--export", required=True, help="export (disk label) the VM uses as its disk")
    parser.add_argument("--machine", required=True, help="whose log the guest keeps")
    parser.add_argument("--status", type=Path, required=True, help="JSON progress file")
    parser.add_argument("--kernel", type=Path, required=True)
    parser.add_argument("--initrd", type=Path, required=True)
    parser.add_argument("--accel", type=Accel, choices=[Accel.KVM, Accel.TCG], default=Accel.TCG)
    parser.add_argument("--rate", type=float, default=16.0, help="files per second, 0 = unlimited")
    parser.add_argument("--memory", type=int, default=128, help="MiB of guest memory")
    args = parser.parse_args(argv)
    rate = max(1, round(args.rate)) if args.rate > 0 else 0  # the guest's shell counts whole files
    append = f"sr.machine={args.machine} sr.rate={rate} sr.mode=log"
    drive = nbd_drive(args.unix, args.export)
    cmd = qemu_command(args.kernel, args.initrd, args.accel, append, drive, args.memory)
    run = args.status.parent
    started = time.monotonic()
    proc = subprocess.Popen(
        cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        preexec_fn=_die_with_parent,
    )  # fmt: skip
    assert proc.stdin is not None and proc.stdout is not None
    (run / QEMU_PID).write_text(f"{proc.pid} {_start_time(proc.pid)}")
    console = Console(args.machine, args.status, proc.stdin)
    console.publish()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        console.command(_COMMANDS[signal.Signals(signum)])

    for sig in _COMMANDS:
        signal.signal(sig, on_signal)
    print(f"guest {args.machine}: {' '.join(cmd)}", flush=True)
    with open(run / "console.log", "a", encoding="utf-8") as log:
        for raw in proc.stdout:
            line = raw.decode(errors="replace").rstrip("\r\n")
            log.write(f"{time.monotonic() - started:8.3f} {line}\n")
            log.flush()
            console.line(line)
            if " VERDICT " in f" {line} ":
                print(f"guest {args.machine}: booted in {time.monotonic() - started:.1f} s, "
                      f"start verdict {console.status.start_verdict}", flush=True)  # fmt: skip
    rc = proc.wait()
    (run / QEMU_PID).unlink(missing_ok=True)
    stopped = rc == 0 and console.status.state is not GuestState.FAILED
    console.publish(GuestState.STOPPED if stopped else GuestState.FAILED)
    print(f"guest {args.machine}: QEMU exited with {rc} after {time.monotonic() - started:.1f} s", flush=True)
    sys.exit(0)


if __name__ == "__main__":
    main()
