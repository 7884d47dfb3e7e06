"""The durability tests' writer, which is not our code: `qemu-io` over NBD, and the check of its records.

`QemuIoWriter` writes 4 KiB records into consecutive slots of a region, in batches: each batch is
one `qemu-io` process writing its slots and flushing every `flush_every` records and at its end. A
batch counts as flushed once its `qemu-io` exited 0 without a failed request, which it does only
after the export answered its last FLUSH; records of a batch that failed (its server was killed
under it) are not counted, and with `retry` the batch is written again, whole, by a new `qemu-io`
once the export accepts again. `bad_records` then checks an image: every flushed slot must hold its
own record, whole.

Two kinds of record (`Records`):
- `PATTERN`: a byte per slot (`aio_write -P`), the requests of a batch in flight together (the way
  a guest queues them). Cheap, but compressible, and slots 251 apart share a byte.
- `UNIQUE`: a self-verifying record per slot (magic, slot, seed, random filler, SHA-256), written
  from a file with `write -s`, one request at a time. Incompressible (so it is stored as written in
  a segment log, where a test can find it) and never taken for another slot's.

`QemuIoSession` drives one interactive `qemu-io` command by command, for a test that checks the
export's state between requests of one connection.
"""

from __future__ import annotations

import hashlib
import struct
import subprocess
import threading
import time
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from tests.conftest import require_tool

RECORD = 4096
_MAGIC = b"SRREC001"
_PROMPT = "qemu-io> "


class Records(Enum):
    PATTERN = "pattern"
    UNIQUE = "unique"


def pattern(slot: int) -> int:
    """A `PATTERN` slot's byte: never 0 (a region starts as zeroes), never its neighbours'."""
    return slot % 251 + 1


def record(slot: int, seed: int = 1) -> bytes:
    """The `UNIQUE` record of `slot`: magic, slot, seed, filler, then a SHA-256 of the rest."""
    head = _MAGIC + struct.pack(">QQ", slot, seed)
    filler = hashlib.shake_256(head).digest(RECORD - len(head) - 32)
    body = head + filler
    return body + hashlib.sha256(body).digest()


def expected(kind: Records, slot: int, seed: int = 1) -> bytes:
    return bytes([pattern(slot)]) * RECORD if kind is Records.PATTERN else record(slot, seed)


def nbd_uri(sock: Path, export: str = "d0") -> str:
    return f"nbd+unix:///{export}?socket={sock}"


def qemu_io_args(sock: Path, export: str = "d0") -> list[str]:
    return [require_tool("qemu-io"), "-f", "raw", nbd_uri(sock, export)]


def failed(out: str) -> bool:
    """Whether qemu-io's output reports a failed request (with -q it says nothing otherwise)."""
    said = out.lower()
    return "error" in said or "failed" in said


def record_file(directory: Path, slot: int, seed: int = 1) -> Path:
    """A file holding the `UNIQUE` record of `slot` (qemu-io's `write -s` reads its buffer from it)."""
    path = directory / f"record-{seed}-{slot}"
    if not path.exists():
        path.write_bytes(record(slot, seed))
    return path


def connects(sock: Path, export: str = "d0") -> bool:
    """Whether the export accepts a client (read-only: no request reaches the disk)."""
    args = [require_tool("qemu-io"), "-r", "-f", "raw", nbd_uri(sock, export), "-c", "length"]
    try:
        done = subprocess.run(args, capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        return False
    return done.returncode == 0 and not failed(done.stdout + done.stderr)


def run(sock: Path, commands: list[str], export: str = "d0") -> subprocess.CompletedProcess[str]:
    """One `qemu-io` running these commands, one after another (`write` waits for its answer)."""
    args = [*qemu_io_args(sock, export)] + [a for c in commands for a in ("-c", c)]
    return subprocess.run(args, capture_output=True, text=True, timeout=120)


def bad_records(image: Path, base: int, slots: range | int, kind: Records, seed: int = 1) -> list[int]:
    """Slots (of `range(slots)` if an int) of the region at `base` not holding their own record whole."""
    bad = []
    with open(image, "rb") as f:
        for slot in range(slots) if isinstance(slots, int) else slots:
            f.seek(base + slot * RECORD)
            if f.read(RECORD) != expected(kind, slot, seed):
                bad.append(slot)
    return bad


@dataclass(frozen=True)
class Batch:
    first: int
    last: int  # exclusive


class QemuIoWriter:
    """Batches of records written and flushed by `qemu-io`, on a thread, until all slots are
    written or `stop()`. With `hold_last`, the last batch waits for `release()` (so writes still go
    on after a test's last kill however fast the rest went). With `pause_at`, the batch holding that
    slot is written command by command and pauses before it (its earlier writes answered, some of
    them not flushed yet, its connection open) until `resume()`: a test kills the server there, so
    the batch is in flight at the kill. With `retry`, a failed batch is counted in `failures` and
    written again, whole; without, the writer stops with `error`."""

    def __init__(
        self,
        sock: Path,
        slots: int,
        *,
        base: int,
        kind: Records,
        workdir: Path,
        batch: int = 512,
        flush_every: int = 64,
        hold_last: bool = False,
        retry: bool = False,
        pause_at: int | None = None,
        export: str = "d0",
    ) -> None:
        self._sock, self._export = sock, export
        self._args = qemu_io_args(sock, export)
        self._pause_at = pause_at
        self._paused = threading.Event()
        self._resumed = threading.Event()
        self.slots, self.base, self.kind, self.batch, self.flush_every = slots, base, kind, batch, flush_every
        self._workdir = workdir
        self._retry = retry
        self.flushed = 0  # records [0, flushed) were written and flushed
        self.failures: list[str] = []  # batches that failed and were written again (with `retry`)
        self.error: str | None = None
        self._changed = threading.Condition()
        self._released = threading.Event()
        if not hold_last:
            self._released.set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="qemu-io-writer", daemon=True)

    def start(self) -> QemuIoWriter:
        self._workdir.mkdir(parents=True, exist_ok=True)
        self._thread.start()
        return self

    def release(self) -> None:
        self._released.set()

    def stop(self) -> None:
        """Start no batch after the current one (which is finished, so it is flushed or failed)."""
        self._stop.set()
        self._released.set()

    def wait_paused(self, timeout: float = 120.0) -> None:
        if not self._paused.wait(timeout):
            raise AssertionError(f"the writer did not reach slot {self._pause_at}: {self.error}")

    def resume(self) -> None:
        self._resumed.set()

    def wait_flushed(self, count: int, timeout: float = 120.0) -> None:
        with self._changed:
            if not self._changed.wait_for(lambda: self.flushed >= count or self.error is not None, timeout):
                raise AssertionError(f"the writer flushed {self.flushed} of {count} records")
        assert self.error is None, self.error

    def join(self) -> None:
        self._thread.join(timeout=300)
        assert not self._thread.is_alive(), "the writer did not finish"
        assert self.error is None, self.error

    def commands(self, batch: Batch) -> list[str]:
        cmds: list[str] = []
        for slot in range(batch.first, batch.last):
            at = self.base + slot * RECORD
            if self.kind is Records.PATTERN:
                cmds += ["-c", f"aio_write -q -P {pattern(slot)} {at} {RECORD}"]
            else:
                cmds += ["-c", f"write -q -s {record_file(self._workdir, slot)} {at} {RECORD}"]
            if (slot + 1) % self.flush_every == 0 or slot + 1 == batch.last:
                cmds += (
                    ["-c", "aio_flush", "-c", "flush"] if self.kind is Records.PATTERN else ["-c", "flush"]
                )
        return cmds

    def _run(self) -> None:
        for first in range(0, self.slots, self.batch):
            batch = Batch(first, min(first + self.batch, self.slots))
            if batch.last == self.slots and not self._released.wait(300):
                self._fail("never released")
                return
            if self._stop.is_set():
                return
            deadline = time.monotonic() + 120
            pause = self._pause_at is not None and batch.first <= self._pause_at < batch.last
            why = self._write_paused(batch) if pause else self._write(batch)
            while why is not None:
                if not self._retry or time.monotonic() > deadline:
                    self._fail(why)
                    return
                self.failures.append(why)
                time.sleep(0.1)  # the export is restarting
                why = self._write(batch)
            with self._changed:
                self.flushed = batch.last
                self._changed.notify_all()

    def _write(self, batch: Batch) -> str | None:
        """None once the batch is written and flushed, else what went wrong."""
        try:
            done = subprocess.run(
                [*self._args, *self.commands(batch)], capture_output=True, text=True, timeout=120
            )
        except subprocess.TimeoutExpired:
            return f"qemu-io hung on records {batch.first}-{batch.last}"
        out = done.stdout + done.stderr
        if done.returncode != 0 or failed(out):
            return f"qemu-io failed on records {batch.first}-{batch.last}: {out[-500:]}"
        return None

    def _write_paused(self, batch: Batch) -> str | None:
        """`_write` through an interactive qemu-io, pausing before the `pause_at` slot's write."""
        cmds = self.commands(batch)[1::2]  # without the "-c"s
        pause = next(i for i, c in enumerate(cmds) if f" {self.base + (self._pause_at or 0) * RECORD} " in c)
        try:
            session = QemuIoSession(self._sock, self._export)
        except AssertionError as exc:
            return f"qemu-io failed on records {batch.first}-{batch.last}: {exc}"
        where = "before the pause"
        try:
            for i, cmd in enumerate(cmds):
                if i == pause:
                    self._paused.set()
                    if not self._resumed.wait(300):
                        return "never resumed"
                    where = "after the pause"
                session.cmd(cmd)
            session.close()
        except AssertionError as exc:
            return f"qemu-io failed on records {batch.first}-{batch.last} {where}: {exc}"
        finally:
            session.kill()
        return None

    def _fail(self, why: str) -> None:
        with self._changed:
            self.error = why
            self._changed.notify_all()


class QemuIoSession:
    """One interactive `qemu-io` on an export: each command answered before `cmd` returns (its
    requests done), so a test can look at the server between requests of one connection."""

    def __init__(self, sock: Path, export: str = "d0") -> None:
        self._proc = subprocess.Popen(
            qemu_io_args(sock, export),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self._read()

    def _read(self) -> str:
        assert self._proc.stdout is not None
        out = ""
        while not out.endswith(_PROMPT):
            char = self._proc.stdout.read(1)
            if not char:
                raise AssertionError(f"qemu-io exited: {out[-500:]}")
            out += char
        return out[: -len(_PROMPT)]

    def cmd(self, line: str) -> str:
        """Run one command; a failed request fails the test."""
        assert self._proc.stdin is not None
        self._proc.stdin.write(line + "\n")
        self._proc.stdin.flush()
        out = self._read()
        assert not failed(out), f"qemu-io {line!r}: {out}"
        return out

    def write(self, offset: int, data_file: Path) -> None:
        self.cmd(f"write -q -s {data_file} {offset} {RECORD}")

    def kill(self) -> None:
        """Gone at once, if not gone already."""
        if self._proc.poll() is None:
            self._proc.kill()
        self._proc.wait()
        for pipe in (self._proc.stdin, self._proc.stdout):
            if pipe is not None:
                pipe.close()

    def close(self) -> None:
        """Quit (qemu-io flushes and disconnects) and wait for it."""
        assert self._proc.stdin is not None
        try:
            self._proc.stdin.write("quit\n")
            self._proc.stdin.close()
        except BrokenPipeError:
            pass
        try:
            code = self._proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
            raise AssertionError("qemu-io did not quit") from None
        assert code == 0, f"qemu-io exited {code}"
