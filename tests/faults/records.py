"""Self-verifying 4 KiB records and the writer that puts them on a protected disk.

Record `n` lives in slot `n` (byte offset n x 4096) and carries a magic, the run id, its sequence
number, filler derived from both, and a SHA-256 of everything before it; so a record is valid only
in its own slot, for its own run, and whole. The writer keeps, for every FLUSH that succeeded, how
many records it covered: those are the records the product promised to keep. Nothing here shares
code with siterecovery (the writer speaks NBD through `nbd_wire`).
"""

from __future__ import annotations

import hashlib
import os
import struct
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.conftest import data_extents
from tests.faults.nbd_wire import NbdClient

RECORD = 4096
MAGIC = b"FLTREC01"
_HEAD = struct.Struct(">8s16sQ")  # magic, run id, sequence number
_SUM = 32
ZERO = bytes(RECORD)


def make_record(run_id: bytes, seq: int) -> bytes:
    head = _HEAD.pack(MAGIC, run_id, seq)
    seed = hashlib.sha256(head).digest()
    filler = (seed * (RECORD // len(seed)))[: RECORD - len(head) - _SUM]
    body = head + filler
    return body + hashlib.sha256(body).digest()


def record_seq(run_id: bytes, slot: int, data: bytes) -> int | None:
    """The record's sequence number if `data` is a whole record of this run in its own slot."""
    if len(data) != RECORD or hashlib.sha256(data[:-_SUM]).digest() != data[-_SUM:]:
        return None
    magic, run, seq = _HEAD.unpack_from(data)
    return int(seq) if magic == MAGIC and run == run_id and seq == slot else None


@dataclass(frozen=True)
class Verdict:
    """What an image holds: `prefix` whole records from slot 0, then `problem` if not clean after."""

    prefix: int
    problem: str = ""

    @property
    def clean(self) -> bool:
        return not self.problem


def check_image(path: Path, run_id: bytes, capacity: int) -> Verdict:
    """A clean prefix: records 0..k-1 valid, then nothing but zeros (no later record, no torn one).

    Only the file's data extents are read (holes read as zeros), so a long run's many points are
    checked in the time their records take, not the disk's size."""
    prefix = -1  # not found yet: every slot so far held its record
    expected = 0
    with open(path, "rb") as f:
        for start, end in data_extents(path):
            for slot in range(start // RECORD, min(capacity, -(-end // RECORD))):
                if prefix < 0 and slot != expected:
                    prefix = expected  # a hole before this slot ends the records
                f.seek(slot * RECORD)
                data = f.read(RECORD)
                data = data + bytes(RECORD - len(data))
                zero = data == ZERO
                ok = not zero and record_seq(run_id, slot, data) is not None
                if prefix < 0:
                    if ok:
                        expected = slot + 1
                        continue
                    prefix = slot
                    if not zero:
                        return Verdict(prefix, f"slot {slot} holds a damaged record")
                    continue
                if ok:
                    return Verdict(prefix, f"empty at record {prefix} but record {slot} is there")
                if not zero:
                    return Verdict(prefix, f"empty at record {prefix} but slot {slot} is not empty")
    return Verdict(expected if prefix < 0 else prefix)


@dataclass
class RecordWriter:
    """Writes records to an NBD export at `rate` per second, FLUSHes every `flush_every`, and
    reconnects (resuming at the first unacknowledged record) whenever the export goes away."""

    socket_path: Path
    export: str
    capacity: int
    rate: float = 60.0
    flush_every: int = 16
    run_id: bytes = field(default_factory=lambda: os.urandom(16))
    written: int = 0  # records 0..written-1 were acknowledged
    flushed: int = 0  # records 0..flushed-1 were covered by a FLUSH that succeeded
    reconnects: int = 0
    last_error: str = ""
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> RecordWriter:
        self._thread = threading.Thread(target=self._run, name="fault-writer", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 120.0) -> None:
        """Stop writing; the last records are flushed first (retrying through a restart)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            assert not self._thread.is_alive(), f"the writer did not stop: {self.last_error}"

    def wait_written(self, count: int, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while self.written < count:
            assert self._thread is not None and self._thread.is_alive(), self.last_error
            assert time.monotonic() < deadline, (
                f"the writer reached {self.written} of {count} records ({self.last_error})"
            )
            time.sleep(0.05)

    def _connect(self) -> NbdClient:
        while True:
            try:
                client = NbdClient(str(self.socket_path), self.export).connect()
                assert client.size >= self.capacity * RECORD, (client.size, self.capacity)
                return client
            except OSError as exc:
                self.last_error = f"connect: {exc}"
                time.sleep(0.1)

    def _run(self) -> None:
        client: NbdClient | None = None
        period = 1.0 / self.rate
        next_at = time.monotonic()
        while True:
            stopping = self._stop.is_set()
            if stopping and self.flushed == self.written:
                break
            try:
                if client is None:
                    client = self._connect()
                    self.reconnects += 1
                if not stopping and self.written < self.capacity:
                    client.write(self.written * RECORD, make_record(self.run_id, self.written))
                    self.written += 1
                if stopping or self.written % self.flush_every == 0 or self.written == self.capacity:
                    upto = self.written
                    client.flush()
                    self.flushed = upto
            except OSError as exc:
                self.last_error = f"{type(exc).__name__}: {exc}"
                if client is not None:
                    client.close()
                client = None
                continue
            next_at += period
            time.sleep(max(0.0, next_at - time.monotonic()))
            next_at = max(next_at, time.monotonic() - period)
        if client is not None:
            client.close()
