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

Durability does not change: O_DIRECT neither flushes the device's write cache nor commits the
file system's allocation metadata, so the caller still fdatasyncs the file before it acknowledges
anything. Reads through the ordinary descriptor stay coherent (a direct write invalidates the
cached pages of its range). A file system that refuses O_DIRECT (tmpfs) or a write the device
refuses for its alignment (EINVAL) makes the writer step aside for good: the caller writes that
run, and every later one, buffered as before.
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
from collections.abc import Sequence
from pathlib import Path

log = logging.getLogger(__name__)

ALIGN = 4096  # offsets and lengths written direct: a multiple of any device's logical block
DIRECT_MIN = 1 << 20  # shorter runs stay buffered (merged by writeback before the fdatasync)
STAGING = 2 << 20  # bytes per direct pwrite; one page-aligned buffer per writer


class DirectWriter:
    """A second, O_DIRECT descriptor of a replica for its long aligned runs (module paragraph)."""

    def __init__(self, path: Path) -> None:
        self._fd = -1
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
        return self._fd >= 0 and length >= DIRECT_MIN and not offset % ALIGN and not length % ALIGN

    def write(self, bufs: Sequence[bytearray | memoryview], offset: int) -> bool:
        """Write the buffers back to back from `offset` (a run that `fits`); False if O_DIRECT was
        refused (the writer is then off, and the caller writes the whole run buffered)."""
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
