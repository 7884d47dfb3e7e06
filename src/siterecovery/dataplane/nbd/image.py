"""An NBD export and its open image: what a disk is served as, and the I/O each request becomes.

`Export` names a raw image, its size and where its writes are recorded (the `CaptureSink`, the
write-intent log). `ExportImage` is the open file shared by every connection to the export: a write
reaches the image (in pieces of at most 64 KiB, `fileio.pwrite_pieces`: no large folios left in the
page cache for later small writes to pay for) and then the sink, zero writes and trims punch holes
so the image stays sparse, and BLOCK_STATUS extents come from SEEK_DATA/SEEK_HOLE.
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from siterecovery.dataplane.before_image import BeforeImageLog
from siterecovery.dataplane.capture import (
    BatchSink,
    CaptureSink,
    LoadAwareSink,
    SettlingSink,
    WriteIntent,
)
from siterecovery.dataplane.fileio import FALLOC_FL_KEEP_SIZE as _FALLOC_FL_KEEP_SIZE
from siterecovery.dataplane.fileio import FALLOC_FL_PUNCH_HOLE as _FALLOC_FL_PUNCH_HOLE
from siterecovery.dataplane.fileio import ZERO_CHUNK as _ZERO_CHUNK
from siterecovery.dataplane.fileio import ZERO_VIEW as _ZERO_VIEW
from siterecovery.dataplane.fileio import fallocate as _fallocate
from siterecovery.dataplane.fileio import is_zero, pread_zero_filled, pwrite_pieces
from siterecovery.dataplane.nbd.wire import MIN_BLOCK_SIZE, STATE_HOLE, STATE_ZERO
from siterecovery.errors import Problem, SiteRecoveryError, Status

LOAD_WINDOW = 0.1  # s: how often a load-aware sink hears the export's busy share
# The run-queue wait counts only in a window whose work share is at least this: a flat-out burst
# (0.3-0.5 of work on the loaded 2-core box), not a trickle of writes on a busy host (a sustained
# 100 MB/s is ~0.1), which is never made to look saturated by other processes' load.
WAIT_COUNTS_FROM = 0.25


class BusyMeter:
    """The share of wall time the export's event-loop thread spends handling requests or waiting
    for a CPU to handle them.

    The connections add each stretch of work (from the start of a receive to the replies handed
    over); once a window has passed, the sink hears the share of it that was work, plus the time
    the thread waited, runnable, for a CPU (the kernel's schedstat). Time between stretches is the
    loop waiting for requests: an export that is never waiting is saturated. The run-queue wait
    matters on a box where other processes take the CPU (the sender child, or a process server and
    master target on the same machine): there the export's requests wait for a CPU rather than in
    its loop, its work share alone stays low, and the sender would keep competing with it. Wait
    inside a stretch of work is counted twice: a starved export leans towards "saturated". The wait
    counts only once the work share reaches `WAIT_COUNTS_FROM`. Called from the event-loop thread
    only.
    """

    def __init__(
        self,
        report: Callable[[float, float], None],
        window: float | None = None,
        waited: Callable[[], float] | None = None,
    ) -> None:
        self._report = report
        self._window = LOAD_WINDOW if window is None else window
        self._start = 0.0  # the window's start (monotonic); 0: none yet
        self._busy = 0.0
        self._waited = waited  # None: this thread's schedstat, opened on first use
        self._schedstat = -1  # its descriptor (-1: not open yet; -2: none to be had)
        self._wait0 = 0.0  # run-queue wait at the window's start

    def _wait(self) -> float:
        if self._waited is not None:
            return self._waited()
        if self._schedstat == -1:
            try:
                self._schedstat = os.open("/proc/thread-self/schedstat", os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                self._schedstat = -2
        if self._schedstat < 0:
            return 0.0
        try:
            return int(os.pread(self._schedstat, 128, 0).split()[1]) / 1e9
        except (OSError, IndexError, ValueError):
            return 0.0

    def add(self, begin: float, end: float) -> None:
        if not self._start:
            self._start = begin
            self._wait0 = self._wait()
        self._busy += end - begin
        span = end - self._start
        if span >= self._window and span > 0:
            wait = self._wait()
            share = self._busy / span
            if share >= WAIT_COUNTS_FROM:
                share = min(1.0, share + (wait - self._wait0) / span)
            self._report(share, end)
            self._start, self._busy, self._wait0 = end, 0.0, wait

    def close(self) -> None:
        if self._schedstat >= 0:
            os.close(self._schedstat)
            self._schedstat = -2


def refused(code: str, message: str, remediation: str) -> SiteRecoveryError:
    return SiteRecoveryError(Problem(code, message, remediation), Status.UNPROCESSABLE)


@dataclass(frozen=True)
class Export:
    """One disk served under `name`: a raw image of exactly `size` bytes and where its writes go."""

    name: str
    path: Path
    size: int
    sink: CaptureSink | None = None
    read_only: bool = False
    min_block_size: int = MIN_BLOCK_SIZE
    intent: WriteIntent | None = None  # marked before each write reaches the image

    @classmethod
    def for_image(
        cls,
        name: str,
        path: Path,
        sink: CaptureSink | None = None,
        *,
        read_only: bool = False,
        intent: WriteIntent | None = None,
    ) -> Export:
        """The export of an existing image, sized from the file."""
        return cls(name, Path(path), os.stat(path).st_size, sink, read_only, intent=intent)


class ExportImage:
    """The open image of one export: positional I/O, hole punching, allocation extents."""

    def __init__(self, export: Export) -> None:
        if export.min_block_size not in (1, 512, 4096):
            raise refused(
                "nbd-export-invalid",
                f"Export {export.name!r} asks for a minimum block size of {export.min_block_size}.",
                "Use 1, 512 or 4096.",
            )
        if export.size <= 0 or export.size % export.min_block_size:
            raise refused(
                "nbd-export-invalid",
                f"Export {export.name!r} has size {export.size}, not a positive multiple of "
                f"{export.min_block_size}.",
                "Resize the image to a whole number of blocks.",
            )
        flags = (os.O_RDONLY if export.read_only else os.O_RDWR) | os.O_CLOEXEC
        try:
            self.fd = os.open(export.path, flags)
        except OSError as exc:
            raise refused(
                "nbd-export-invalid",
                f"Image {export.path} of export {export.name!r} cannot be opened: {exc.strerror}.",
                "Create the image file or fix its permissions.",
            ) from exc
        st = os.fstat(self.fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size != export.size:
            os.close(self.fd)
            raise refused(
                "nbd-export-invalid",
                f"Image {export.path} of export {export.name!r} is not a regular file of {export.size} "
                f"bytes (it has {st.st_size}).",
                "Serve the image with its real size (Export.for_image reads it).",
            )
        self.export = export
        self.size = export.size
        self.sink = export.sink
        # Called once per batch of requests read, if the sink holds writes back until then.
        self.settle = export.sink.settle if isinstance(export.sink, SettlingSink) else None
        self._record_writes = export.sink.record_writes if isinstance(export.sink, BatchSink) else None
        self.intent = export.intent
        sink = export.sink
        self.meter = BusyMeter(sink.export_load) if isinstance(sink, LoadAwareSink) else None
        self.can_punch = _fallocate is not None
        # A snapshot of the disk is kept as a before-image log: old chunks go there before writes.
        self.before: BeforeImageLog | None = None
        if not export.read_only:
            try:
                self.before = BeforeImageLog.open_for(export.path, self.fd)
            except BaseException:
                os.close(self.fd)
                raise

    def close(self) -> None:
        if self.meter is not None:
            self.meter.close()
        if self.before is not None:
            self.before.close()
        if self.intent is not None:
            self.flush()  # so a clean stop leaves nothing for the write-intent log to compare
            self.intent.close()
        os.close(self.fd)

    def _intend(self, offset: int, length: int) -> None:
        # The connection marked its queued requests' extents in one go; this is the bit test.
        if self.intent is not None and not self.intent.covers(offset, length):
            self.intent.mark([(offset, length)], self.flush)

    def write(self, offset: int, data: memoryview) -> None:
        """Apply a write, then record it; an all-zero payload becomes a hole."""
        if is_zero(data):
            self.zero(offset, len(data), punch=True)
            return
        self._intend(offset, len(data))
        if self.before is not None and self.before.active:
            self.before.preserve(offset, len(data))
        pwrite_pieces(self.fd, data, offset)
        if self.sink is not None:
            self.sink.record_write(offset, data)
        if self.intent is not None:
            self.intent.recorded(offset, len(data))

    def write_many(self, writes: list[tuple[int, memoryview]], *, marked: bool = False) -> None:
        """Apply checked writes in order, then record them all with one call to the sink.

        The connection's batch of plain writes. If it raises, some writes may have reached the
        image (or the sink) and others not; the caller applies them again one by one. A batch
        with an all-zero payload (a hole to punch, a zero record) takes the one-by-one path, so
        the records keep the image's order; so does one whose range is not marked in the
        write-intent log yet (the connection marks ahead; marking here, between a batch's image
        writes and their records, could unmark the extent of a write not recorded yet). `marked`:
        the caller made sure every write's range is marked already (the connection, which tested
        each one while taking it into the batch), so they are not tested again here.
        """
        fd, intent = self.fd, self.intent
        if any(not data[0] and is_zero(data) for _, data in writes) or (
            intent is not None
            and not marked
            and not all(intent.covers(offset, len(data)) for offset, data in writes)
        ):
            for offset, data in writes:
                self.write(offset, data)
            return
        before = self.before if self.before is not None and self.before.active else None
        for offset, data in writes:
            if before is not None:
                before.preserve(offset, len(data))
            pwrite_pieces(fd, data, offset)
        if self._record_writes is not None:
            self._record_writes(writes)
        elif self.sink is not None:
            for offset, data in writes:
                self.sink.record_write(offset, data)
        if intent is not None:
            intent.recorded_writes(writes)

    def zero(self, offset: int, length: int, *, punch: bool) -> None:
        """Make the range read as zeroes (a hole unless `punch` is false), then record it."""
        self._intend(offset, length)
        if self.before is not None and self.before.active:
            self.before.preserve(offset, length)
        if punch and self.can_punch:
            self._punch(offset, length)
        else:
            self._write_zeroes(offset, length)
        if self.sink is not None:
            self.sink.record_zero(offset, length)
        if self.intent is not None:
            self.intent.recorded(offset, length)

    def flush(self) -> None:
        checkpoint = self.intent.checkpoint() if self.intent is not None else 0
        os.fdatasync(self.fd)
        if self.sink is not None:
            self.sink.flush()
        if self.intent is not None:
            self.intent.flushed(checkpoint)

    def _punch(self, offset: int, length: int) -> None:
        assert _fallocate is not None
        if _fallocate(self.fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length) == 0:
            return
        err = ctypes.get_errno()
        if err not in (errno.EOPNOTSUPP, errno.ENOSYS):
            raise OSError(err, os.strerror(err))
        # The file system cannot punch holes: remember it and write zeroes from now on.
        self.can_punch = False
        self._write_zeroes(offset, length)

    def _write_zeroes(self, offset: int, length: int) -> None:
        end = offset + length
        while offset < end:
            offset += os.pwrite(self.fd, _ZERO_VIEW[: min(_ZERO_CHUNK, end - offset)], offset)

    def read_into(self, view: memoryview, offset: int) -> None:
        # Past the end reads as zeroes (only if the image shrank under us).
        pread_zero_filled(self.fd, view, offset)

    def extents(self, offset: int, length: int, max_extents: int) -> list[tuple[int, int]]:
        """(length, base:allocation flags) runs from `offset`, from SEEK_DATA/SEEK_HOLE."""
        end = offset + length
        out: list[tuple[int, int]] = []
        pos = offset
        # A descriptor length is a u32; keep each a whole number of 4 KiB blocks.
        cap = 0xFFFFF000
        while pos < end and len(out) < max_extents:
            try:
                data = os.lseek(self.fd, pos, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:  # no data from pos to the end of the file
                    data = end
                elif exc.errno == errno.EINVAL:  # no SEEK_DATA here: report allocated
                    return [(min(length, cap), 0)]
                else:
                    raise
            if data > pos:
                stop, flags = min(data, end, pos + cap), STATE_HOLE | STATE_ZERO
            else:
                hole = os.lseek(self.fd, pos, os.SEEK_HOLE)
                stop, flags = min(hole, end, pos + cap), 0
            if out and out[-1][1] == flags and out[-1][0] + (stop - pos) <= cap:
                out[-1] = (out[-1][0] + stop - pos, flags)
            else:
                out.append((stop - pos, flags))
            pos = stop
        return out
