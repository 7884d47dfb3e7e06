"""Writing a replica's long runs with O_DIRECT, past the page cache.

Measured with `perf` on the master target during a full sync (issue 16): 45 % of its CPU was the
kernel copying applied bytes into fresh page-cache pages (`copy_folio_from_iter_atomic`) — pages
the journal then dropped again, since a replica's bytes are rarely read back soon — and on this
VM each fresh page is also a fault on the host. A run of at least `DIRECT_MIN` bytes whose offset
and length are multiples of `ALIGN` now goes through a second descriptor opened with O_DIRECT,
copied first into one page-aligned staging buffer (O_DIRECT needs aligned memory; the staging
pages stay mapped, so that copy is a plain memcpy). Short or unaligned writes stay buffered: a
direct 4 KiB write would wait for the device each time, where buffered ones are merged by
writeback before the caller's fdatasync.

A frame's payload received into a page-aligned buffer of `POOL` (`mt_inbox.py`) is written from
that buffer as it is, with no staging copy: the receive thread's copy out of the TLS reader is then
the only copy between the socket and the device. Such buffers are recycled (a fresh anonymous page
is a page fault, on this VM also a host fault), at most `POOL_KEEP` of them kept free.

Durability does not change: O_DIRECT neither flushes the device's write cache nor commits the
file system's allocation metadata, so the caller still fdatasyncs the file before it acknowledges
anything. Reads through the ordinary descriptor stay coherent (a direct write invalidates the
cached pages of its range). A file system that refuses O_DIRECT (tmpfs) or a write the device
refuses for its alignment (EINVAL) makes the writer step aside for good: the caller writes that
run, and every later one, buffered as before.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import mmap
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import TypeGuard

log = logging.getLogger(__name__)

ALIGN = 4096  # offsets and lengths written direct: a multiple of any device's logical block
DIRECT_MIN = 1 << 20  # shorter runs stay buffered (merged by writeback before the fdatasync)
STAGING = 2 << 20  # bytes per direct pwrite; one page-aligned buffer per writer
POOL_BUFFER = 1 << 20  # a pooled buffer holds one frame of this size (a sync's coarse block)
POOL_KEEP = 128  # free pooled buffers kept for reuse (128 MiB); more are unmapped when given back
_IOV_MAX = 1024  # buffers in one pwritev (Linux's IOV_MAX)


class AlignedPool:
    """Page-aligned buffers of `POOL_BUFFER` bytes, recycled (see the module's paragraph).

    `take` hands out a view of a whole buffer; whoever ends up holding it gives it back once,
    after its last use (the journal, when it has written it); a view never given back is freed.
    """

    def __init__(self, size: int = POOL_BUFFER, keep: int = POOL_KEEP) -> None:
        self.size = size
        self._keep = keep
        self._free: list[mmap.mmap] = []
        self._lock = threading.Lock()

    def take(self) -> memoryview:
        with self._lock:
            buf = self._free.pop() if self._free else None
        return memoryview(buf if buf is not None else mmap.mmap(-1, self.size))

    def owns(self, view: memoryview | bytearray) -> TypeGuard[memoryview]:
        """Whether `view` is a whole buffer taken from this pool."""
        return isinstance(view, memoryview) and isinstance(view.obj, mmap.mmap) and len(view) == self.size

    def give(self, view: memoryview) -> None:
        buf = view.obj
        view.release()
        assert isinstance(buf, mmap.mmap)
        with self._lock:
            if len(self._free) < self._keep:
                self._free.append(buf)


POOL = AlignedPool()


def aligned(buf: bytearray | memoryview) -> bool:
    """Whether O_DIRECT can write `buf` as it is: its address and length multiples of `ALIGN`."""
    if len(buf) % ALIGN or not len(buf):
        return False
    view = memoryview(buf)
    if view.readonly or not view.c_contiguous:
        return False
    with view:
        return ctypes.addressof(ctypes.c_char.from_buffer(view)) % ALIGN == 0


class DirectWriter:
    """A second, O_DIRECT descriptor of a replica for its long aligned runs (module paragraph)."""

    def __init__(self, path: Path, min_length: int = DIRECT_MIN) -> None:
        self._fd = -1
        self._min_length = min_length  # shorter runs are left to the caller's buffered writes
        self._staging: mmap.mmap | None = None
        flag = getattr(os, "O_DIRECT", 0)
        if not flag:
            return
        try:
            self._fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC | flag)
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            log.info("%s refuses O_DIRECT: its writes stay buffered", path)

    def fits(self, offset: int, length: int) -> bool:
        """Whether a run is written direct: long enough and aligned, and O_DIRECT still works."""
        return self._fd >= 0 and length >= self._min_length and not offset % ALIGN and not length % ALIGN

    def write(self, bufs: Sequence[bytearray | memoryview], offset: int) -> bool:
        """Write the buffers back to back from `offset` (a run that `fits`); False if O_DIRECT was
        refused (the writer is then off, and the caller writes the whole run buffered)."""
        if all(aligned(b) for b in bufs):
            try:
                self._put_aligned(bufs, offset)
                return True
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                log.info("a direct write at %d was refused (%s): writes stay buffered", offset, exc)
                self.close()
                return False
        if self._staging is None:
            self._staging = mmap.mmap(-1, STAGING)
        staging = memoryview(self._staging)
        refused = False
        try:
            fill, at = 0, offset
            for b in bufs:
                src = memoryview(b).cast("B")
                pos = 0
                while pos < len(src):
                    n = min(len(src) - pos, STAGING - fill)
                    staging[fill : fill + n] = src[pos : pos + n]
                    fill, pos = fill + n, pos + n
                    if fill == STAGING:
                        self._put(staging, at)
                        at, fill = at + fill, 0
            if fill:
                self._put(staging[:fill], at)
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            log.info("a direct write at %d was refused (%s): writes stay buffered", offset, exc)
            refused = True
        finally:
            staging.release()
        if refused:  # closed only here: the exception's frames held views of the staging buffer
            self.close()
        return not refused

    def _put_aligned(self, bufs: Sequence[bytearray | memoryview], at: int) -> None:
        """pwritev straight from aligned buffers; a short write's rest goes through `_put`."""
        for k in range(0, len(bufs), _IOV_MAX):
            chunk = bufs[k : k + _IOV_MAX]
            total = sum(len(b) for b in chunk)
            done = os.pwritev(self._fd, chunk, at)
            skip = done
            for b in chunk:  # rare: finish buffer by buffer from where the short write stopped
                if skip >= len(b):
                    skip -= len(b)
                    continue
                self._put(memoryview(b)[skip:], at + done)
                done += len(b) - skip
                skip = 0
            at += total

    def _put(self, view: memoryview, at: int) -> None:
        done = 0
        while done < len(view):  # a short write leaves an unaligned rest: EINVAL, then buffered
            done += os.pwrite(self._fd, view[done:], at + done)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if self._staging is not None:
            self._staging.close()
            self._staging = None
