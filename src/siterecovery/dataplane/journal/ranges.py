"""Sorted disjoint byte ranges the journal keeps in memory while it applies and moves the disk.

`_Pending` holds disk writes whose undo records are not yet durable (the write-ahead rule);
`_Ranges` tells a rollback batch whether a record overlaps one already in it.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right

from siterecovery.dataplane.direct_write import POOL, DirectWriter
from siterecovery.dataplane.fileio import pwritev_all

# A drained run at least this long is a streaming write (a sync's blocks, a guest's large
# sequential writes): its pages are dropped from the page cache once durable (`_JournalLog.sync`).
STREAM_RUN = 1 << 20


class _Pending:
    """Disk writes whose undo records are journaled but not yet fsynced: disjoint, sorted by offset.

    Holding them back until the journal is durable is the write-ahead rule; an overlapping write
    merges into the range it overlaps, so reading "old bytes" sees every earlier write.
    """

    __slots__ = ("bufs", "nbytes", "starts", "streamed")

    def __init__(self) -> None:
        self.starts: list[int] = []
        self.bufs: list[bytearray | memoryview] = []  # memoryviews: owned buffers handed over
        self.nbytes = 0
        self.streamed: list[tuple[int, int]] = []  # runs of >= STREAM_RUN drained: (offset, length)

    def _span(self, off: int, end: int) -> tuple[int, int]:
        i = bisect_right(self.starts, off) - 1
        if i < 0 or self.starts[i] + len(self.bufs[i]) <= off:
            i += 1
        return i, bisect_left(self.starts, end, lo=i)

    def overlaps(self, off: int, end: int) -> bool:
        i, j = self._span(off, end)
        return i < j

    def overlay(self, off: int, view: memoryview) -> None:
        end = off + len(view)
        i, j = self._span(off, end)
        for k in range(i, j):
            s, b = self.starts[k], self.bufs[k]
            lo, hi = max(off, s), min(end, s + len(b))
            view[lo - off : hi - off] = b[lo - s : hi - s]

    def add(self, off: int, data: memoryview, *, owned: bool = False) -> None:
        """Hold a write; with `owned` the caller hands `data`'s buffer over (it is kept, not
        copied, unless it overlaps a held range) and never touches it again."""
        end = off + len(data)
        i, j = self._span(off, end)
        if i == j:
            self.starts.insert(i, off)
            self.bufs.insert(i, data if owned else bytearray(data))
            self.nbytes += len(data)
            return
        lo = min(off, self.starts[i])
        hi = max(end, self.starts[j - 1] + len(self.bufs[j - 1]))
        if j == i + 1 and lo == self.starts[i] and hi == lo + len(self.bufs[i]):
            self.bufs[i][off - lo : end - lo] = data
        else:
            merged = bytearray(hi - lo)
            for k in range(i, j):
                s, b = self.starts[k], self.bufs[k]
                merged[s - lo : s - lo + len(b)] = b
                self.nbytes -= len(b)
                _recycle(b)  # copied into the merged range: nothing else refers to it
            merged[off - lo : end - lo] = data
            self.starts[i:j] = [lo]
            self.bufs[i:j] = [merged]
            self.nbytes += len(merged)
        if owned:
            _recycle(data)  # copied into a held range: the caller gave it up

    def drain(self, fd: int, direct: DirectWriter | None = None) -> None:
        """Write everything, one pwritev per run of adjacent ranges; a long aligned run through
        `direct` instead (past the page cache, `direct_write.py`)."""
        k, n = 0, len(self.starts)
        while k < n:
            run_end = k + 1
            while (
                run_end < n
                and run_end - k < 1024
                and self.starts[run_end] == self.starts[run_end - 1] + len(self.bufs[run_end - 1])
            ):
                run_end += 1
            run = self.starts[run_end - 1] + len(self.bufs[run_end - 1]) - self.starts[k]
            bufs = self.bufs[k:run_end]
            if direct is not None and direct.fits(self.starts[k], run) and direct.write(bufs, self.starts[k]):
                k = run_end
                continue  # nothing entered the page cache: nothing to drop
            pwritev_all(fd, bufs, self.starts[k])
            if run >= STREAM_RUN:
                self.streamed.append((self.starts[k], run))
            k = run_end
        for b in self.bufs:
            _recycle(b)  # written: the receive thread may fill it again
        self.starts.clear()
        self.bufs.clear()
        self.nbytes = 0


def _recycle(buf: bytearray | memoryview) -> None:
    """Give `buf` back to the pool if it came from there (its last use is over)."""
    if POOL.owns(buf):
        POOL.give(buf)


class _Ranges:
    """Disjoint ranges, sorted: answers "does this range overlap any so far?" in O(log n)."""

    __slots__ = ("ends", "starts")

    def __init__(self) -> None:
        self.starts: list[int] = []
        self.ends: list[int] = []

    def overlaps(self, off: int, end: int) -> bool:
        i = bisect_right(self.starts, off) - 1
        if i >= 0 and self.ends[i] > off:
            return True
        return i + 1 < len(self.starts) and self.starts[i + 1] < end

    def add(self, off: int, end: int) -> None:
        i = bisect_left(self.starts, off)
        self.starts.insert(i, off)
        self.ends.insert(i, end)
