"""Block digests of a master target's replica, kept as writes are applied (a resync's target side).

A delta resync compares the source's block digests with the replica's (`blocks.py`). Reading the
replica for them would cost a second read of the whole disk, so the master target keeps, per pair,
the fine digests (xxh3-128 of each 4 KiB) of every coarse block (1 MiB) as it applies writes, and a
resync is answered from this store: only the source side reads its disk. A block the store does not
know (never written by this master target, a write not aligned to 4 KiB, a crash) is read from the
replica when a resync asks for it, and remembered.

Files, in the pair's state directory:
- `digests.fine`: the 256 fine digests of coarse block i at offset i * 4096 (sparse);
- `digests.state`: a header (magic, block sizes, disk size, the replica's device, inode and
  modification time at the last clean close, a clean flag), then one byte per coarse block: UNKNOWN
  (read the replica), ZERO (reads as zeroes) or DATA (its fine digests are in `digests.fine`).

The rule: a state byte on disk says ZERO or DATA only while the replica holds the bytes its digests
describe. So before the first write into an extent (64 coarse blocks) the extent's state bytes are
set to UNKNOWN on disk, with one fdatasync (`before_write`; the next few extents with it, as a sync
writes in disk order). The digests of applied writes live in memory until `flush` (called after
the applier's own sync made the writes durable) writes them; once an extent was not written for
`COOL_SECONDS` they are fdatasynced, and only then are its state bytes restored from memory, at most
every `COOL_EVERY` seconds (so a stream of writes pays neither a mark nor an fdatasync per batch).
An unclean stop therefore leaves every extent that was being written UNKNOWN: its blocks are read
from the replica by the next resync, never trusted. Anything that changes the replica outside the
applied stream (moving it to a point, a batch the journal undid) calls `forget`. A replica changed
while no master target ran is caught by its modification time, checked against the one recorded at
the last clean close.
"""

from __future__ import annotations

import os
import struct
import time
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path

import xxhash

from siterecovery.dataplane.blocks import (
    COARSE,
    DIGEST_SIZE,
    FINE,
    zero_coarse_digest,
    zero_digest,
    zero_fine_digests,
)
from siterecovery.dataplane.fileio import pread_full, pwritev_all

EXTENT_BLOCKS = 64  # coarse blocks marked together before a write (64 MiB)
MARK_AHEAD = 7  # extents marked with the one written first (a sequential stream: one fdatasync)
COOL_SECONDS = 2.0  # an extent not written for this long is unmarked at the next flush
COOL_EVERY = 5.0  # seconds between unmarkings
# Fine digests of DATA blocks kept in memory as written (4 KiB each: 16 MiB, 4 GiB of disk), so a
# block written again after a flush is not read back from `digests.fine` first.
CLEAN_BLOCKS = 4096
_MAGIC = b"SRTD0001"
# magic, coarse, fine, size, st_dev, st_ino, st_mtime_ns, clean
_HEADER = struct.Struct(">8sIIQQQQI")
_FINES = COARSE // FINE * DIGEST_SIZE
_IOV_MAX = 1024  # buffers in one pwritev (Linux's IOV_MAX)


class BlockState(IntEnum):
    UNKNOWN = 0
    ZERO = 1
    DATA = 2


@dataclass
class DigestCounters:
    """What the store saved a resync (for stats, tests and benches)."""

    blocks_answered: int = 0  # coarse blocks answered from the store
    replica_bytes_read: int = 0  # bytes read from the replica for blocks the store did not know


class TargetDigests:
    """The block digests of one replica. Driven under the pair's lock (one thread at a time)."""

    def __init__(self, directory: Path, target: Path, size: int) -> None:
        self.target = target
        self.size = size
        self.nblocks = (size + COARSE - 1) // COARSE
        self._nextents = (self.nblocks + EXTENT_BLOCKS - 1) // EXTENT_BLOCKS
        self.counters = DigestCounters()
        directory.mkdir(parents=True, exist_ok=True)
        self._state_path = directory / "digests.state"
        fresh = not self._state_path.exists()
        self._fine_fd = os.open(directory / "digests.fine", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self._state_fd = os.open(self._state_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self._read_fd = os.open(target, os.O_RDONLY | os.O_CLOEXEC)
        self.state = bytearray(self.nblocks)  # the truth, in memory
        self._dirty: dict[int, bytearray] = {}  # fine digests changed since the last flush
        self._clean: dict[int, bytearray] = {}  # DATA blocks: as in `digests.fine` (oldest first)
        self._restate: set[int] = set()  # blocks whose state byte must be written at the flush
        self._hot: dict[int, float] = {}  # extents marked UNKNOWN on disk -> last write time
        self._buf = bytearray(COARSE)
        self._cooled_at = time.monotonic()
        self._load(fresh)

    # ---- opening and closing ------------------------------------------------------------------

    def _identity(self) -> tuple[int, int, int]:
        st = os.fstat(self._read_fd)
        return st.st_dev, st.st_ino, st.st_mtime_ns

    def _header(self, clean: bool) -> bytes:
        dev, ino, mtime = self._identity()
        return _HEADER.pack(_MAGIC, COARSE, FINE, self.size, dev, ino, mtime, int(clean))

    def _load(self, fresh: bool) -> None:
        raw = os.pread(self._state_fd, _HEADER.size + self.nblocks, 0)
        trusted = False
        if not fresh and len(raw) == _HEADER.size + self.nblocks:
            magic, coarse, fine, size, dev, ino, mtime, clean = _HEADER.unpack_from(raw)
            same = (magic, coarse, fine, size) == (_MAGIC, COARSE, FINE, self.size)
            # After a clean close the replica must be untouched since; after an unclean stop the
            # extents being written are UNKNOWN on disk already (and the journal's recovery on
            # open has just written there).
            untouched = (dev, ino, mtime) == self._identity() or not clean
            trusted = same and untouched and self._identity()[:2] == (dev, ino)
        if trusted:
            self.state[:] = raw[_HEADER.size :]
        elif fresh and not _has_data(self._read_fd, self.size):
            self.state[:] = bytes([BlockState.ZERO]) * self.nblocks  # a new, empty replica
        # Running: a crash from here on is an unclean stop.
        os.pwrite(self._state_fd, self._header(clean=False) + bytes(self.state), 0)
        os.fdatasync(self._state_fd)

    def close(self) -> None:
        """Flush everything and record the replica's identity: the next open trusts the store."""
        self._hot_cool(float("inf"))
        self.flush()
        os.pwrite(self._state_fd, self._header(clean=True), 0)
        os.fdatasync(self._state_fd)
        for fd in (self._fine_fd, self._state_fd, self._read_fd):
            os.close(fd)

    # ---- applying -----------------------------------------------------------------------------

    def before_write(self, offset: int, length: int) -> None:
        """Mark the extents of [offset, +length) UNKNOWN on disk (once per cooled extent)."""
        if length <= 0:
            return
        now = time.monotonic()
        first = offset // COARSE // EXTENT_BLOCKS
        last = (offset + length - 1) // COARSE // EXTENT_BLOCKS
        cold = [e for e in range(first, last + 1) if e not in self._hot]
        for e in range(first, last + 1):
            self._hot[e] = now
        if not cold:
            return
        # Syncs and most streams write in disk order: the extents after these are marked in the
        # same fdatasync (a crash then costs reading them again, nothing more).
        ahead = range(last + 1, min(last + 1 + MARK_AHEAD, self._nextents))
        cold += [e for e in ahead if e not in self._hot]
        for e in cold:
            self._hot.setdefault(e, now)
            lo = e * EXTENT_BLOCKS
            hi = min(lo + EXTENT_BLOCKS, self.nblocks)
            os.pwrite(self._state_fd, bytes(hi - lo), _HEADER.size + lo)
        os.fdatasync(self._state_fd)

    def wrote(self, offset: int, data: memoryview, fines: bytes | None = None) -> None:
        """`data` was applied at `offset` (after `before_write`); `fines`, if given, are
        `fine_digests(data)` of a whole coarse block, computed already (`mt_inbox.py`)."""
        if fines is not None and not offset % COARSE and len(data) == COARSE and offset + COARSE <= self.size:
            idx = offset // COARSE
            self._restate.add(idx)
            self._dirty[idx] = bytearray(fines)
            self.state[idx] = BlockState.DATA
            return
        self._update(offset, len(data), data)

    def zeroed(self, offset: int, length: int) -> None:
        self._update(offset, length, None)

    def _update(self, offset: int, length: int, data: memoryview | None) -> None:
        end = min(offset + length, self.size)
        pos = offset
        while pos < end:
            idx = pos // COARSE
            base = idx * COARSE
            stop = min(base + COARSE, end)
            self._update_block(idx, pos - base, stop - base, data, pos - offset)
            pos = stop

    def _update_block(self, idx: int, lo: int, hi: int, data: memoryview | None, at: int) -> None:
        block_len = min(COARSE, self.size - idx * COARSE)
        self._restate.add(idx)
        if data is None and lo == 0 and hi >= block_len:
            self.state[idx] = BlockState.ZERO
            self._dirty.pop(idx, None)
            self._clean.pop(idx, None)
            return
        if lo % FINE or (hi % FINE and hi != block_len):
            # Part of a fine block: its digest would need the rest of it from the replica.
            self.state[idx] = BlockState.UNKNOWN
            self._dirty.pop(idx, None)
            self._clean.pop(idx, None)
            return
        digest = xxhash.xxh3_128_digest
        if data is not None and lo == 0 and hi == COARSE:  # a whole block (a full sync): hash it
            self._dirty[idx] = bytearray(fine_digests(data[at : at + COARSE]))
            self.state[idx] = BlockState.DATA
            return
        fines = self._fines(idx)
        if fines is None:
            self.state[idx] = BlockState.UNKNOWN
            return
        for f in range(lo, hi, FINE):
            n = min(FINE, hi - f)
            if data is None:
                d = zero_digest(FINE)
            else:
                chunk = data[at + f - lo : at + f - lo + n]
                d = digest(chunk) if n == FINE else digest(bytes(chunk) + bytes(FINE - n))
            k = f // FINE * DIGEST_SIZE
            fines[k : k + DIGEST_SIZE] = d
        self.state[idx] = BlockState.DATA
        self._dirty[idx] = fines

    def _fines(self, idx: int) -> bytearray | None:
        """The fine digests of block `idx` to update in place, or None while it is UNKNOWN."""
        if idx in self._dirty:
            return self._dirty[idx]
        state = self.state[idx]
        if state == BlockState.ZERO:
            return bytearray(zero_fine_digests())
        if state == BlockState.DATA:
            # Taken out: the caller changes it and it becomes dirty.
            fines = self._clean.pop(idx, None)
            return fines if fines is not None else bytearray(os.pread(self._fine_fd, _FINES, idx * _FINES))
        return None

    def forget(self, durable: bool = True) -> None:
        """The replica changed outside the applied stream: trust nothing until read again."""
        self.state[:] = bytes(self.nblocks)
        self._dirty.clear()
        self._clean.clear()
        self._restate.clear()
        if durable:
            os.pwrite(self._state_fd, bytes(self.nblocks), _HEADER.size)
            os.fdatasync(self._state_fd)

    def forget_unflushed(self) -> None:
        """The applier undid writes not yet synced (a full volume): their digests are void."""
        for idx in self._restate:
            self.state[idx] = BlockState.UNKNOWN
        self._dirty.clear()

    def flush(self) -> None:
        """After the applier's sync: persist the digests of what it applied, unmark cooled extents."""
        dirty = sorted(self._dirty.items())
        start = 0
        for k in range(1, len(dirty) + 1):  # one pwritev per run of consecutive blocks
            if k == len(dirty) or dirty[k][0] != dirty[k - 1][0] + 1 or k - start >= _IOV_MAX:
                pwritev_all(self._fine_fd, [fines for _, fines in dirty[start:k]], dirty[start][0] * _FINES)
                start = k
        self._clean.update(dirty)
        while len(self._clean) > CLEAN_BLOCKS:
            del self._clean[next(iter(self._clean))]
        self._dirty.clear()
        now = time.monotonic()
        if now - self._cooled_at >= COOL_EVERY:
            # Not at every flush: each unmarking costs two fdatasyncs, which on a busy disk
            # (a full sync writing the replica) wait for much more than these small files.
            self._cooled_at = now
            self._hot_cool(now - COOL_SECONDS)
        restate = sorted(i for i in self._restate if i // EXTENT_BLOCKS not in self._hot)
        if not restate:
            return  # digests of blocks marked UNKNOWN on disk need no fdatasync yet
        # A block whose state says UNKNOWN on disk may have its digests rewritten in place
        # without a sync; they must be durable before its state says otherwise.
        os.fdatasync(self._fine_fd)
        self._restate.difference_update(restate)
        start = 0
        for k in range(1, len(restate) + 1):  # one write per run of consecutive blocks
            if k == len(restate) or restate[k] != restate[k - 1] + 1:
                lo, hi = restate[start], restate[k - 1] + 1
                os.pwrite(self._state_fd, self.state[lo:hi], _HEADER.size + lo)
                start = k
        os.fdatasync(self._state_fd)

    def _hot_cool(self, before: float) -> None:
        """Unmark the extents last written before `before` (rewritten from memory at the flush)."""
        for e, at in list(self._hot.items()):
            if at < before:
                del self._hot[e]
                lo = e * EXTENT_BLOCKS
                self._restate.update(range(lo, min(lo + EXTENT_BLOCKS, self.nblocks)))

    # ---- answering a resync -------------------------------------------------------------------

    def unknown(self, blocks: list[int]) -> bool:
        return any(self.state[i] == BlockState.UNKNOWN for i in blocks)

    def digests(self, idx: int) -> tuple[bytes, bytes]:
        """Coarse digest and fine digests of block `idx`; an UNKNOWN block is read from the replica
        (the caller synced the applier first) and remembered."""
        state = self.state[idx]
        if state == BlockState.UNKNOWN:
            self._learn(idx)
            state = self.state[idx]
        else:
            self.counters.blocks_answered += 1
        if state == BlockState.ZERO:
            return zero_coarse_digest(), zero_fine_digests()
        fines = self._dirty.get(idx)
        got = bytes(fines) if fines is not None else os.pread(self._fine_fd, _FINES, idx * _FINES)
        return xxhash.xxh3_128_digest(got), got

    def _learn(self, idx: int) -> None:
        view = memoryview(self._buf)
        n = pread_full(self._read_fd, view, idx * COARSE)
        if n < COARSE:
            view[n:] = bytes(COARSE - n)
        self.counters.replica_bytes_read += n
        self._restate.add(idx)
        self._clean.pop(idx, None)
        if xxhash.xxh3_128_digest(view) == zero_digest(COARSE):
            self.state[idx] = BlockState.ZERO
            self._dirty.pop(idx, None)
            return
        self._dirty[idx] = bytearray(fine_digests(view))
        self.state[idx] = BlockState.DATA


def fine_digests(block: memoryview) -> bytes:
    """The fine digests of a whole coarse block, in order."""
    digest = xxhash.xxh3_128_digest
    return b"".join([digest(block[o : o + FINE]) for o in range(0, COARSE, FINE)])


def _has_data(fd: int, size: int) -> bool:
    try:
        return os.lseek(fd, 0, os.SEEK_DATA) < size
    except OSError:  # ENXIO: no data at all
        return False
