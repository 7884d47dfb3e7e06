"""A test guest: writes a self-verifying log (numbered, checksummed records) as a replication stream.

The guest produces the ordered stream an agent would capture (writes, zero ranges, bookmarks), so
the test can feed it to a `JournaledDisk` with any lag, resend any part of it, and compute the exact
disk image at any sequence number (`model_at`). The log is written like a file system appends: whole
4 KiB blocks, rewriting the partial tail block, in writes of one to three blocks, so recovery points
can fall in the middle of a record. `parse_log` is the crash-consistency oracle.
"""

from __future__ import annotations

import random
import struct
from dataclasses import dataclass
from enum import IntEnum

import xxhash

from siterecovery.dataplane.apply import DiskApplier

BLOCK = 4096
MAGIC = b"LOGR"
_HDR = struct.Struct("<4sB3xQI")  # magic, kind, record number, payload length
_SUM = struct.Struct("<Q")


class RecKind(IntEnum):
    DATA = 1
    QUIESCE = 2  # written while the guest is frozen, just before an app-consistent bookmark


class OpKind(IntEnum):
    WRITE = 1
    ZERO = 2
    BOOKMARK = 3


@dataclass(frozen=True)
class Op:
    seq: int
    kind: OpKind
    offset: int = 0
    data: bytes = b""
    length: int = 0
    tag: str = ""
    point_kind: str = ""
    timestamp: float = 0.0


@dataclass(frozen=True)
class LogVerdict:
    records: int
    last_kind: int
    clean: bool  # whole records 1..n, then at most a torn prefix of record n+1, then zeroes
    torn: bool  # a partial record n+1 follows the last whole one
    reason: str = ""


def parse_log(img: bytes | bytearray, region: int) -> LogVerdict:
    at = n = last_kind = 0
    while at + _HDR.size <= region:
        magic, kind, num, plen = _HDR.unpack_from(img, at)
        end = at + _HDR.size + plen + _SUM.size
        if magic != MAGIC or num != n + 1 or end > region:
            break
        (csum,) = _SUM.unpack_from(img, end - _SUM.size)
        if xxhash.xxh3_64_intdigest(bytes(img[at : end - _SUM.size])) != csum:
            break
        n, last_kind, at = n + 1, kind, end
    tail = bytes(img[at:region]).rstrip(b"\0")
    if not tail:
        return LogVerdict(n, last_kind, True, False)
    if tail[:4] != MAGIC[: len(tail[:4])]:
        return LogVerdict(n, last_kind, False, True, f"garbage after record {n} at offset {at}")
    if len(tail) >= _HDR.size:
        _m, _k, num, plen = _HDR.unpack_from(tail, 0)
        if num != n + 1:
            return LogVerdict(n, last_kind, False, True, f"record {num} follows record {n} (a gap)")
        if len(tail) > _HDR.size + plen + _SUM.size:
            return LogVerdict(n, last_kind, False, True, f"data past the torn record {n + 1}")
    return LogVerdict(n, last_kind, True, True)


class Guest:
    """Deterministic for a given seed and call sequence; the first half of the disk holds the log."""

    def __init__(self, size: int, seed: int) -> None:
        self.size = size
        self.log_region = size // 2
        self.rng = random.Random(seed)
        self.history: list[Op] = []
        self.log = bytearray()
        self.records = 0

    @property
    def seq(self) -> int:
        return len(self.history)

    def _op(self, kind: OpKind, **kw: object) -> None:
        self.history.append(Op(self.seq + 1, kind, **kw))  # type: ignore[arg-type]

    def append(self, kind: RecKind = RecKind.DATA) -> None:
        self.records += 1
        body = self.rng.randbytes(self.rng.randrange(64, 6000))
        rec = _HDR.pack(MAGIC, kind, self.records, len(body)) + body
        rec += _SUM.pack(xxhash.xxh3_64_intdigest(rec))
        start = len(self.log) // BLOCK * BLOCK
        self.log += rec
        if len(self.log) > self.log_region:
            raise ValueError("log region full: use a bigger disk or fewer records")
        pos = start
        while pos < len(self.log):
            end = min(pos + BLOCK * self.rng.randint(1, 3), -(-len(self.log) // BLOCK) * BLOCK)
            chunk = bytes(self.log[pos:end]).ljust(end - pos, b"\0")
            self._op(OpKind.WRITE, offset=pos, data=chunk)
            pos = end

    def scratch(self) -> None:
        """Unrelated churn in the second half: overwrites and zero ranges (like metadata, trim)."""
        blocks = (self.size - self.log_region) // BLOCK
        n = self.rng.randint(1, 16)
        off = self.log_region + self.rng.randrange(blocks - n) * BLOCK
        if self.rng.random() < 0.2:
            self._op(OpKind.ZERO, offset=off, length=n * BLOCK)
        else:
            self._op(OpKind.WRITE, offset=off, data=self.rng.randbytes(n * BLOCK))

    def fill_scratch(self, chunk: int = 1 << 20) -> None:
        """Overwrite the whole second half with random data, `chunk` bytes per write."""
        for off in range(self.log_region, self.size, chunk):
            self._op(OpKind.WRITE, offset=off, data=self.rng.randbytes(min(chunk, self.size - off)))

    def bookmark(self, point_kind: str, tag: str, timestamp: float) -> None:
        self._op(OpKind.BOOKMARK, tag=tag, point_kind=point_kind, timestamp=timestamp)

    def model_at(self, seq: int) -> bytes:
        img = bytearray(self.size)
        for op in self.history[:seq]:
            if op.kind is OpKind.WRITE:
                img[op.offset : op.offset + len(op.data)] = op.data
            elif op.kind is OpKind.ZERO:
                img[op.offset : op.offset + op.length] = bytes(op.length)
        return bytes(img)


class Feeder:
    """The sender side: applies the guest's stream in order, resends from any sequence."""

    def __init__(self, disk: DiskApplier, guest: Guest) -> None:
        self.disk = disk
        self.guest = guest
        self.next = 0  # index into history == seq of the last op sent

    @property
    def behind(self) -> int:
        return self.guest.seq - self.next

    def feed(self, count: int | None = None) -> int:
        """Apply up to `count` ops (all if None); an exception leaves the op to be sent again."""
        done = 0
        while self.next < self.guest.seq and (count is None or done < count):
            op = self.guest.history[self.next]
            if op.kind is OpKind.WRITE:
                self.disk.apply_write(op.seq, op.offset, memoryview(op.data))
            elif op.kind is OpKind.ZERO:
                self.disk.apply_zero(op.seq, op.offset, op.length)
            else:
                self.disk.bookmark(op.seq, op.tag, op.point_kind, op.timestamp)
            self.next += 1
            done += 1
        return done

    def resend_after(self, seq: int) -> None:
        self.next = seq
