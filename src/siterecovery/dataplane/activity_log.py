"""The write-intent (activity) log of one exported disk: which extents may differ from the spool.

A write reaches the image first and the spool a moment later; an agent that dies in between leaves
a write on the disk that no frame carries, and no later sync would look for it. So, as DRBD's
activity log does, every write's extent (4 MiB) is marked in a small on-disk bitmap, durably,
before the write touches the image, and unmarked only once the capture covering it is durable
(the sink was flushed after the write was recorded). After an unclean stop the extents still
marked are the only places where the disk and the replica can disagree: the agent compares them by
block digests with the target and resyncs what differs (`SyncKind.INTENT`).

Marking is cheap where it matters: an extent already marked costs a bit test; the extents of all
the requests queued on a connection are marked together with one write and one fdatasync (the NBD
server calls `mark` once per batch); unmarking is lazy, folded into the next mark's write. The
number of marked extents is bounded (`limit`): past it, the sink is flushed so older extents can
be unmarked, which also bounds the resync after a crash (limit x 4 MiB compared, not the disk).
A write stream that runs on into the next extent (the extent before it is marked) has extents
after it marked in the same write: `AHEAD`, or as many as the run of marked extents it comes from,
up to `AHEAD_MAX`, so a long sequential stream pays one fdatasync per doubling of its run (7 for the
first GiB, then one per GiB) instead of one per 4 MiB. That fdatasync was the export's largest wait
under 1 MiB sequential writes: with replication running, other writers keep the device busy and a
single one took 60 ms. Marking more than is written is always safe; it only widens the comparison
after a crash, within the same limit.

File: a 16-byte header (magic, extent size, extent count), then one bit per extent. Writes only
change bits of the bitmap in place; a torn write can only leave a bit set that was being cleared
(harmless) or unset a bit whose mark was never acknowledged (its write had not started).
"""

from __future__ import annotations

import logging
import os
import struct
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from siterecovery.dataplane.fileio import fsync_dir

log = logging.getLogger(__name__)

EXTENT = 4 << 20
LIMIT = 1024  # marked extents at most (4 GiB): what a crash may cost to compare
AHEAD = 7  # extents marked ahead of a sequential stream (at least), within the limit
AHEAD_MAX = 255  # ... and at most (1 GiB): as many as the marked run the stream comes from
_HEADER = struct.Struct(">8sII")
_MAGIC = b"SRAL0001"
_PENDING = 1 << 62  # marked, its write not recorded yet: never unmarked before it is


class ActivityLog:
    """Write-intent bitmap of one disk. Called from the NBD server's event-loop thread only."""

    def __init__(self, path: Path, size: int, extent: int = EXTENT, limit: int = LIMIT) -> None:
        self.path = path
        self.extent = extent
        self.limit = limit
        self.nextents = (size + extent - 1) // extent
        self._bits = bytearray((self.nextents + 7) // 8)
        self._last: dict[int, int] = {}  # marked extent -> record count of its last recorded write
        self._count = 0  # writes recorded by the sink so far
        self._durable = 0  # writes the sink has made durable (count at the last flush)
        self.commits = 0  # fdatasyncs done (for tests and benches)
        self.recovered = self._open()

    def _open(self) -> list[int]:
        """Open or create the file; the extents left marked by an unclean stop."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self._fd = fd
        raw = os.pread(fd, _HEADER.size + len(self._bits), 0)
        if not raw:
            os.pwrite(fd, _HEADER.pack(_MAGIC, self.extent, self.nextents) + self._bits, 0)
            os.fdatasync(fd)
            fsync_dir(self.path.parent)
            return []
        magic, extent, nextents = _HEADER.unpack_from(raw.ljust(_HEADER.size, b"\0"))
        if (magic, extent, nextents) != (_MAGIC, self.extent, self.nextents):
            # Not ours or another geometry: any extent may be dirty, compare them all.
            log.warning("activity log %s unreadable or of another geometry: all is compared", self.path)
            recovered = list(range(self.nextents))
            os.ftruncate(fd, 0)
            os.pwrite(fd, _HEADER.pack(_MAGIC, self.extent, self.nextents) + self._bits, 0)
        else:
            self._bits[:] = raw[_HEADER.size :].ljust(len(self._bits), b"\0")
            recovered = [e for e in range(self.nextents) if self._bits[e >> 3] & (1 << (e & 7))]
        for e in recovered:
            self._set(e)
            self._last[e] = _PENDING  # until `forget_recovered`: the caller must cover them first
        if recovered:
            self._write(0, len(self._bits))
        return recovered

    # --- the write path ------------------------------------------------------------------------

    def covers(self, offset: int, length: int) -> bool:
        """Every extent of the range is marked already (the common, free case)."""
        bits, e = self._bits, offset // self.extent
        last = (offset + max(length, 1) - 1) // self.extent
        if e == last and e < self.nextents:  # one extent: most writes
            return bool(bits[e >> 3] & (1 << (e & 7)))
        # Past the end: the export refuses the request, nothing will be written.
        last = min(last, self.nextents - 1)
        while e <= last:
            if not bits[e >> 3] & (1 << (e & 7)):
                return False
            e += 1
        return True

    def mark(self, ranges: Iterable[tuple[int, int]], flush: Callable[[], None]) -> None:
        """Durably mark the extents of `ranges` (one write, one fdatasync) before they are written.

        `flush` makes every recorded write durable in the sink; it is called only when the log
        is full of extents whose writes are not durable yet.
        """
        want: set[int] = set()
        for offset, length in ranges:
            first = offset // self.extent
            if first >= self.nextents:
                continue
            last = min((offset + max(length, 1) - 1) // self.extent, self.nextents - 1)
            want.update(e for e in range(first, last + 1) if not self._bits[e >> 3] & (1 << (e & 7)))
        if not want:
            return
        clean = [e for e, n in self._last.items() if n <= self._durable]
        if len(self._last) - len(clean) + len(want) > self.limit:
            flush()  # every write recorded so far becomes durable: its extent may be unmarked
            clean = [e for e, n in self._last.items() if n <= self._durable]
        lo, hi = len(self._bits), 0
        for e in clean:
            self._clear(e)
            del self._last[e]
            lo, hi = min(lo, e >> 3), max(hi, (e >> 3) + 1)
        for e in want:
            self._set(e)
            self._last[e] = _PENDING
            lo, hi = min(lo, e >> 3), max(hi, (e >> 3) + 1)
        for e in self._ahead(want):
            self._set(e)
            self._last[e] = self._count  # nothing pending: unmarked after the next flush
            lo, hi = min(lo, e >> 3), max(hi, (e >> 3) + 1)
        self._write(lo, hi)

    def _ahead(self, want: set[int]) -> list[int]:
        """Extents after those of a stream running on from a marked extent, while room is left."""
        room = self.limit - len(self._last)
        ahead: list[int] = []
        for e in sorted(want):
            run = 0  # marked extents right before e
            while (
                run < AHEAD_MAX
                and e - run > 0
                and self._bits[(e - run - 1) >> 3] & (1 << ((e - run - 1) & 7))
            ):
                run += 1
            if not run:
                continue
            for n in range(e + 1, min(e + 1 + max(AHEAD, run), self.nextents)):
                if room <= len(ahead):
                    return ahead
                if not self._bits[n >> 3] & (1 << (n & 7)) and n not in ahead:
                    ahead.append(n)
        return ahead

    def recorded(self, offset: int, length: int) -> None:
        """The write at `offset` was handed to the sink (after the image)."""
        self._count += 1
        for e in range(offset // self.extent, (offset + max(length, 1) - 1) // self.extent + 1):
            if e in self._last:
                self._last[e] = self._count

    def recorded_writes(self, writes: Sequence[tuple[int, memoryview]]) -> None:
        """`recorded` for each `(offset, data)` write of a batch, in order."""
        last, extent, count = self._last, self.extent, self._count
        for offset, data in writes:
            count += 1
            e = offset // extent
            end = (offset + max(len(data), 1) - 1) // extent
            while e <= end:
                if e in last:
                    last[e] = count
                e += 1
        self._count = count

    def checkpoint(self) -> int:
        """Take before flushing the sink; pass to `flushed` once the flush returned."""
        return self._count

    def flushed(self, checkpoint: int) -> None:
        """Every write recorded up to `checkpoint` is durable in the sink: its extent may go."""
        self._durable = max(self._durable, checkpoint)

    # --- recovery and shutdown -----------------------------------------------------------------

    def recovered_ranges(self) -> list[tuple[int, int]]:
        return [(e * self.extent, self.extent) for e in self.recovered]

    def forget_recovered(self) -> None:
        """The extents left by an unclean stop are now covered elsewhere (a resync is recorded)."""
        for e in self.recovered:
            self._last[e] = 0  # unmarked with the next mark's write (or at close)
        self.recovered = []

    def close(self) -> None:
        """Clean stop (the sink was flushed): unmark what is durable, so nothing is compared."""
        for e, n in list(self._last.items()):
            if n <= self._durable:
                self._clear(e)
                del self._last[e]
        self._write(0, len(self._bits))
        os.close(self._fd)

    @property
    def marked(self) -> int:
        return len(self._last)

    def _set(self, e: int) -> None:
        self._bits[e >> 3] |= 1 << (e & 7)

    def _clear(self, e: int) -> None:
        self._bits[e >> 3] &= ~(1 << (e & 7)) & 0xFF

    def _write(self, lo: int, hi: int) -> None:
        if hi > lo:
            os.pwrite(self._fd, self._bits[lo:hi], _HEADER.size + lo)
        os.fdatasync(self._fd)
        self.commits += 1
