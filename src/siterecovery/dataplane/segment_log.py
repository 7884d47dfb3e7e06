"""An append-only, segmented log of encoded frames: the agent's spool and the process server's cache.

One log holds one pair's frames in increasing sequence order, in segment files named after their
first sequence number. A hop appends, `sync()`s (fsync) before acknowledging upstream, reads the
log back with cursors to send downstream, and frees whole segments once downstream acknowledged
their last frame. On open, a torn tail left by a crash (a partly written frame) is cut off; every
frame before it was either fsynced (and acknowledged) or never acknowledged, so nothing
acknowledged is lost.
A new segment's name is made durable by the next `sync()` together with its frames, not when
it is created: nothing in it is promised before, and a directory fsync per roll stalled writers.

The agent's export appends small frames with `defer`: they are gathered in memory and written with
one system call when the export has taken every request it had read (`settle`), or by the next
`append`/`sync`. A deferred frame is not in the file yet, and readers do not see it: it is
promised nothing more than an appended one (only `sync` promises), and the export's write-intent
log covers its range until a sync. A write that fails keeps the frames for the next try; only the
owner drops them (`discard_deferred`), after recording their ranges another way.

A bad frame header *followed by intact frames* is not a torn tail but damage (a flipped bit on the
disk): the scan resynchronises on the next offset whose header verifies and whose payload matches
its digest, keeps every intact frame after it, and rewrites the segment without the damaged bytes.
Which frames the damaged range held is unknown, so the log records a `LogDamage` durably (in
`damage.json`, before the segment is rewritten) for its owner to act on: the process server and
the agent have the whole pair compared with the replica (a delta resync) and raise an alert. A
reader that meets a bad header in a running log has it indexed again the same way (`repair`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import mmap
import os
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

from siterecovery.dataplane.direct_write import ALIGN, DirectWriter
from siterecovery.dataplane.fileio import fsync_dir as _fsync_dir
from siterecovery.dataplane.fileio import pread_full, pwritev_all, write_durably
from siterecovery.dataplane.protocol import (
    HEADER_SIZE,
    MAGIC,
    Header,
    ProtocolError,
    frame_intact,
    parse_header,
)
from siterecovery.dataplane.spool_tail import SpoolTail

log = logging.getLogger(__name__)

_SUFFIX = ".seg"
_DAMAGE = "damage.json"
_REWRITE = ".rewrite"  # a segment being rewritten without its damaged bytes
DEFER_PAYLOAD = 64 << 10  # larger payloads are written at once (with the frames deferred before them)
_DEFER_BYTES = 1 << 20  # deferred frames are written out once they fill this much
# In a log opened with `direct`, a settled batch of at least this many bytes is written by the
# log's writer thread while the export goes on (`_Flight`), and a write this large goes past the
# page cache (its page-aligned middle; see `_put`). Smaller batches (4 KiB writes at QD32 settle
# ~140 KiB) stay buffered and written at once, as in any log: a direct write waits for the device.
DIRECT_FRAME = 512 << 10
_BATCH_BYTES = 8 << 20  # each of a direct log's two page-aligned batch buffers


@dataclass(frozen=True)
class LogDamage:
    """Bytes of a segment that held no verifiable frame, with intact frames after them."""

    segment: str  # file name
    offset: int  # where the damage starts in the segment as it was
    skipped: int  # bytes dropped
    after_seq: int  # the last intact frame before the damage (-1: none in this log)
    resumed_seq: int  # the first intact frame after it; the lost frames lie strictly between


@dataclass
class _Segment:
    first_seq: int
    last_seq: int
    size: int
    path: Path


class SegmentLog:
    """Frames of one pair, appended in sequence order. Thread-safe."""

    def __init__(self, directory: Path, segment_bytes: int = 64 << 20, *, direct: bool = False) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        self._segment_bytes = segment_bytes
        self._direct = direct  # batches in aligned buffers, large writes with O_DIRECT (`_Flight`)
        self._refused = False  # the file system refused O_DIRECT: writes stay buffered
        self._direct_writer: DirectWriter | None = None  # the current segment's O_DIRECT descriptor
        self._direct_bufs: list[mmap.mmap] = []  # [filling, spare]; allocated on first use
        self._lead = 0  # where the deferred batch starts in the filling buffer (`_defer_direct`)
        self._flight: _Flight | None = None  # the batch the writer thread is writing
        self._flight_error: OSError | None = None  # ... and its error, raised by the next settle
        self._flyer: ThreadPoolExecutor | None = None
        self.direct_bytes = 0  # bytes written past the page cache so far
        self._lock = threading.Lock()
        self.appended = threading.Condition(self._lock)
        self._segments: list[_Segment] = []
        self._fd: int | None = None
        self._unsynced: list[int] = []
        self._rolls = 0  # segments created so far ...
        self._rolls_durable = 0  # ... and how many of their names an fsync of the directory covers
        self._damage_path = directory / _DAMAGE
        self._tail: SpoolTail | None = None
        self._deferred = bytearray()  # frames not written yet (`defer`); allocated on first use
        self._deferred_len = 0
        self._deferred_last = -1  # sequence of the newest deferred frame
        self.damage: list[LogDamage] = []
        if self._damage_path.exists():
            self.damage = [LogDamage(**d) for d in json.loads(self._damage_path.read_text())]
        for stale in directory.glob(f"*{_SUFFIX}{_REWRITE}"):
            stale.unlink()  # a rewrite interrupted by a crash (the segment itself is intact)
        self._open_segments(sorted(directory.glob(f"*{_SUFFIX}")))

    def _open_segments(self, paths: list[Path], known_last: int = -1) -> list[LogDamage]:
        """Index the segments: cut a torn tail, skip (and record) damage followed by intact frames.

        `known_last`: the newest frame appended (a live log, `repair`): every frame up to it was
        whole, so a bad tail before it is damage too.
        """
        scans = [_scan(path) for path in paths]
        found: list[LogDamage] = []
        last = -1
        for i, scan in enumerate(scans):
            for bad in scan.bad:
                after = bad.after_seq if bad.after_seq >= 0 else last
                found.append(LogDamage(scan.path.name, bad.offset, bad.skipped, after, bad.resumed_seq))
            if scan.cut_at is not None and any(later.first >= 0 for later in scans[i + 1 :]):
                # Not the log's tail: intact frames follow in a later segment.
                resumed = next(later.first for later in scans[i + 1 :] if later.first >= 0)
                after = scan.last if scan.last >= 0 else last
                found.append(LogDamage(scan.path.name, scan.cut_at, scan.size - scan.cut_at, after, resumed))
            last = scan.last if scan.last >= 0 else last
        tail = next((scan for scan in reversed(scans) if scan.cut_at is not None or scan.first >= 0), None)
        if tail is not None and tail.cut_at is not None and last < known_last:
            lost = tail.size - tail.cut_at
            found.append(LogDamage(tail.path.name, tail.cut_at, lost, last, known_last + 1))
        found = [d for d in found if d not in self.damage]  # found again after a crash mid-rewrite
        if found:
            # Recorded before any byte is dropped: a crash while rewriting cannot hide the damage.
            self.damage.extend(found)
            write_durably(self._damage_path, json.dumps([asdict(d) for d in self.damage]).encode())
            for d in found:
                log.error(
                    "segment log %s: %d damaged bytes at %s:%d (frames after %d, before %d lost); "
                    "intact frames after them are kept",
                    self.directory,
                    d.skipped,
                    d.segment,
                    d.offset,
                    d.after_seq,
                    d.resumed_seq,
                )
        for scan in scans:
            seg = scan.apply()
            if seg is None:
                scan.path.unlink()
            else:
                self._segments.append(seg)
        if found:
            _fsync_dir(self.directory)
        return found

    def share_tail(self, tail: SpoolTail) -> None:
        """Publish where the log ends into `tail` from now on (a reader in another process)."""
        with self._lock:
            self._tail = tail
            self._publish()

    def _publish(self) -> None:
        if self._tail is not None:
            seg = self._segments[-1] if self._segments else None
            if seg is None:
                self._tail.publish(-1, 0, -1)
            else:
                self._tail.publish(seg.first_seq, seg.size, seg.last_seq)

    def repair(self) -> list[LogDamage]:
        """A reader met a bad frame header in the live log: index it again as on open (the damage
        found is recorded in `damage`); appends go on in a new segment."""
        with self._lock:
            self._write_deferred_now()
            if self._fd is not None:
                self._unsynced.append(self._fd)  # fdatasynced and closed by the next sync()
                self._fd = None
            self._close_direct()
            known_last = self._segments[-1].last_seq if self._segments else -1
            paths = [seg.path for seg in self._segments]
            self._segments = []
            found = self._open_segments(paths, known_last)
            self._publish()
            return found

    def clear_damage(self) -> None:
        """The owner has taken over the damage (persisted its resync and alert): forget it."""
        with self._lock:
            self.damage = []
            self._damage_path.unlink(missing_ok=True)

    @property
    def last_seq(self) -> int:
        """Sequence of the newest frame held (deferred ones included), or -1 when empty."""
        with self._lock:
            return self._last_held()

    @property
    def first_seq(self) -> int:
        with self._lock:
            return self._segments[0].first_seq if self._segments else -1

    @property
    def bytes_used(self) -> int:
        with self._lock:
            flying = self._flight.size if self._flight is not None else 0
            return sum(s.size for s in self._segments) + flying + self._deferred_len

    def append(self, seq: int, header: bytes | bytearray | memoryview, payload: memoryview | bytes) -> None:
        """Append one frame (header + payload) whose sequence is `seq`."""
        with self._lock:
            self._check_order(seq)
            self._land_flight(raise_error=True)
            if self._fd is None or self._segments[-1].size + self._deferred_len >= self._segment_bytes:
                self._write_deferred()
                self._roll(seq)
            self._write([header, payload], seq)

    def defer(self, seq: int, header: bytes | bytearray | memoryview, payload: memoryview | bytes) -> None:
        """Append one frame, written out by the next `settle`, `append` or `sync` (see the module
        docstring); `payload` may be reused once this returns."""
        with self._lock:
            self._check_order(seq)
            if self._direct:
                self._defer_direct(seq, header, payload)
                return
            size = len(header) + len(payload)
            if self._fd is None or self._segments[-1].size + self._deferred_len >= self._segment_bytes:
                self._write_deferred()
                self._roll(seq)
            if len(payload) > DEFER_PAYLOAD:
                self._write([header, payload], seq)  # one writev with the frames deferred before it
                return
            if self._deferred_len + size > len(self._deferred):
                self._write_deferred()
                if not self._deferred:
                    self._deferred = bytearray(_DEFER_BYTES)  # kept: no page faults per batch
            at = self._deferred_len
            self._deferred[at : at + len(header)] = header
            self._deferred[at + len(header) : at + size] = payload
            self._deferred_len += size
            self._deferred_last = seq

    def defer_many(self, frames: Sequence[tuple[int, bytearray, memoryview]]) -> None:
        """`defer` for each `(seq, header, payload)` of one batch, in order, under one lock (a batch
        may take its segment past `segment_bytes`; the next frame rolls)."""
        with self._lock:
            if not frames:
                return
            self._check_order(frames[0][0])
            if self._direct:
                for seq, header, payload in frames:
                    self._defer_direct(seq, header, payload)
                return
            if self._fd is None or self._segments[-1].size + self._deferred_len >= self._segment_bytes:
                self._write_deferred()
                self._roll(frames[0][0])
            deferred, at = self._deferred, self._deferred_len
            last = self._deferred_last
            for seq, header, payload in frames:
                hlen, size = len(header), len(header) + len(payload)
                if size > DEFER_PAYLOAD or at + size > len(deferred):
                    self._deferred_len, self._deferred_last = at, last
                    if size > DEFER_PAYLOAD:
                        self._write([header, payload], seq)  # with the frames deferred before it
                        at, last = 0, seq
                        continue
                    self._write_deferred()
                    if not self._deferred:
                        self._deferred = deferred = bytearray(_DEFER_BYTES)
                    at = 0
                deferred[at : at + hlen] = header
                deferred[at + hlen : at + size] = payload
                at += size
                last = seq
            self._deferred_len, self._deferred_last = at, last

    def settle(self, *, wait: bool = False) -> bool:
        """Write out the deferred frames (one system call). A `direct` log holding a batch of at
        least `DIRECT_FRAME` bytes, or any batch behind one in flight, hands it to its writer thread
        instead and returns, unless `wait`. A batch whose write failed in the background raises
        here, at the next settle (`_Flight`). True if a batch is left in flight."""
        with self._lock:
            if self._direct and self._deferred_len and (self._deferred_len >= DIRECT_FRAME or self._flight):
                self._launch()
            elif self._deferred_len:
                self._land_flight(raise_error=True)
                self._write_deferred()
            self._land_flight(raise_error=True, wait=wait)
            return self._flight is not None

    def discard_deferred(self) -> None:
        """Drop the deferred frames (their write failed; the owner recorded their ranges)."""
        with self._lock:
            self._deferred_len = 0
            self._deferred_last = -1

    def _last_held(self) -> int:
        last = self._segments[-1].last_seq if self._segments else -1
        if self._flight is not None:
            last = max(last, self._flight.last_seq)
        return max(last, self._deferred_last) if self._deferred_len else last

    def _check_order(self, seq: int) -> None:
        last = self._last_held()
        if seq <= last:
            raise ValueError(f"sequence {seq} is not after {last}")

    def _write_deferred(self) -> None:
        if self._deferred_len:
            self._write([], self._deferred_last)

    def _write_deferred_now(self) -> None:
        """Write the deferred frames once no batch is in flight; after a failed batch, drop them
        (they follow a gap; the owner records their ranges when its next settle raises)."""
        self._land_flight()
        if self._flight_error is not None:
            self._deferred_len = 0
        else:
            self._write_deferred()

    def _deferred_view(self) -> memoryview:
        if self._direct_bufs:
            lead = self._lead
            return memoryview(self._direct_bufs[0])[lead : lead + self._deferred_len]
        return memoryview(self._deferred)[: self._deferred_len]

    def _write(self, frames: list[bytes | bytearray | memoryview], last_seq: int) -> None:
        """Write the deferred frames, then `frames`, at the end of the current segment (lock held,
        no batch in flight)."""
        assert self._fd is not None and self._flight is None
        seg = self._segments[-1]
        bufs = [self._deferred_view(), *frames] if self._deferred_len else frames
        want = sum(len(b) for b in bufs)
        writer = self._direct_writer if want >= DIRECT_FRAME else None
        try:
            direct = _put(self._fd, writer, bufs, seg.size, want)
        except OSError:
            # A short write on a regular file is ENOSPC; make the tail whole (the deferred frames
            # stay deferred).
            os.ftruncate(self._fd, seg.size)
            raise
        if direct < 0:
            self._direct_off()
        else:
            self.direct_bytes += direct
        self._deferred_len = 0
        seg.size += want
        seg.last_seq = last_seq
        if self._tail is not None:
            self._tail.publish(seg.first_seq, seg.size, last_seq)
        self.appended.notify_all()

    # --- a direct log's batches, written by its writer thread -----------------------------------

    def _defer_direct(
        self, seq: int, header: bytes | bytearray | memoryview, payload: memoryview | bytes
    ) -> None:
        """`defer` in a direct log: the frame goes into the page-aligned batch buffer, laid out so
        that the batch's file offset and its place in the buffer agree modulo `ALIGN` (its
        aligned middle is then written from the buffer itself, with no copy). Lock held."""
        if self._fd is None or self._reserved_end() >= self._segment_bytes:
            self._write_deferred_now()
            self._roll(seq)
        size = len(header) + len(payload)
        if self._deferred_len and self._lead + self._deferred_len + size > _BATCH_BYTES:
            self._launch()  # the buffer is full: write it in the background, fill the other one
        if not self._direct_bufs:
            self._direct_bufs = [mmap.mmap(-1, _BATCH_BYTES), mmap.mmap(-1, _BATCH_BYTES)]
        if not self._deferred_len:
            self._lead = self._reserved_end() % ALIGN
        if self._lead + size > _BATCH_BYTES:  # a frame larger than the buffer: written at once
            self._write_deferred_now()
            if self._flight_error is None:
                self._write([header, payload], seq)
            return
        buf = self._direct_bufs[0]
        at = self._lead + self._deferred_len
        buf[at : at + len(header)] = header
        buf[at + len(header) : at + size] = payload
        self._deferred_len += size
        self._deferred_last = seq

    def _reserved_end(self) -> int:
        """Where the next deferred frame lands in the current segment (lock held)."""
        end = self._segments[-1].size if self._segments else 0
        return end + (self._flight.size if self._flight is not None else 0) + self._deferred_len

    def _launch(self) -> None:
        """Hand the deferred batch to the writer thread (after the one before it has landed) and
        switch to the other buffer. Lock held."""
        self._land_flight()
        if self._flight_error is not None:
            # An earlier batch failed: this one follows a gap and is dropped too; the next
            # `settle` raises, and the owner records every range since its last good settle.
            self._deferred_len = 0
            return
        if not self._deferred_len:
            return
        assert self._fd is not None
        seg = self._segments[-1]
        flight = _Flight(
            seg,
            self._fd,
            self._direct_writer,
            self._direct_bufs[0],
            self._lead,
            self._deferred_len,
            self._deferred_last,
        )
        self._flight = flight
        self._direct_bufs.reverse()
        self._deferred_len = 0
        if self._flyer is None:
            self._flyer = ThreadPoolExecutor(1, thread_name_prefix=f"spool-{self.directory.parent.name}")
        self._flyer.submit(self._fly, flight)

    def _fly(self, flight: _Flight) -> None:
        """Writer thread: write one batch, then publish it (or keep its error for `settle`)."""
        error: OSError | None = None
        direct = 0
        view = memoryview(flight.buf)[flight.lead : flight.lead + flight.size]
        try:
            writer = flight.writer if flight.size >= DIRECT_FRAME else None
            direct = _put(flight.fd, writer, [view], flight.segment.size, flight.size)
        except OSError as exc:
            error = exc
        finally:
            view.release()
        with self._lock:
            seg = flight.segment
            if error is None:
                seg.size += flight.size
                seg.last_seq = flight.last_seq
                if self._tail is not None and seg is self._segments[-1]:
                    self._tail.publish(seg.first_seq, seg.size, seg.last_seq)
            else:
                log.error("segment log %s: a batch write failed: %s", self.directory, error)
                with contextlib.suppress(OSError):
                    os.ftruncate(flight.fd, seg.size)
                self._flight_error = error
            if direct < 0:
                self._direct_off()
            else:
                self.direct_bytes += direct
            self._flight = None
            self.appended.notify_all()

    def _land_flight(self, *, raise_error: bool = False, wait: bool = True) -> None:
        """Wait (lock held, released meanwhile) until no batch is in flight; with `raise_error`,
        raise (once) the error of a batch that failed."""
        while wait and self._flight is not None:
            self.appended.wait()
        if raise_error and self._flight_error is not None:
            error, self._flight_error = self._flight_error, None
            raise error

    def _direct_off(self) -> None:
        """O_DIRECT was refused: this log writes through the page cache from now on."""
        self._close_direct()
        self._refused = True

    def _close_direct(self) -> None:
        if self._direct_writer is not None:
            self._direct_writer.close()
            self._direct_writer = None

    def _roll(self, seq: int) -> None:
        if self._fd is not None:
            self._unsynced.append(self._fd)
        path = self.directory / f"{seq:020d}{_SUFFIX}"
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        self._close_direct()
        if self._direct and not self._refused:
            self._direct_writer = DirectWriter(path, min_length=ALIGN)
            if not self._direct_writer.fits(0, ALIGN):  # the file system refuses O_DIRECT
                self._direct_off()
        self._segments.append(_Segment(seq, seq - 1, 0, path))
        # Its name is made durable by the next sync(), with its frames: nothing in it is promised
        # before then, and an fsync of the directory here stalled the export's writes.
        self._rolls += 1

    def sync(self) -> None:
        """Make every appended frame durable (deferred ones are written first)."""
        with self._lock:
            self._write_deferred_now()
            fds, self._unsynced = self._unsynced, []
            rolls = self._rolls
            # A duplicate of the current segment's descriptor: `free_through` on another thread may
            # close the original while we fdatasync outside the lock ("Bad file descriptor").
            current = os.dup(self._fd) if self._fd is not None else None
        for fd in fds:
            os.fdatasync(fd)
            os.close(fd)
        if current is not None:
            try:
                os.fdatasync(current)
            finally:
                os.close(current)
        if rolls > self._rolls_durable:
            # Cleared only once done: a concurrent sync() does not return before the names are durable.
            _fsync_dir(self.directory)
            with self._lock:
                self._rolls_durable = max(self._rolls_durable, rolls)

    def free_through(self, seq: int) -> None:
        """Delete segments whose every frame has sequence <= `seq` (acknowledged downstream)."""
        with self._lock:
            keep: list[_Segment] = []
            for i, seg in enumerate(self._segments):
                current = i == len(self._segments) - 1
                busy = self._deferred_len or self._flight is not None
                if seg.size > 0 and seg.last_seq <= seq and not (current and busy):
                    if current and self._fd is not None:
                        os.close(self._fd)
                        self._fd = None
                        self._close_direct()
                    seg.path.unlink(missing_ok=True)
                else:
                    keep.append(seg)
            self._segments = keep

    def clear(self) -> None:
        """Drop everything (the pair is re-synchronised from scratch)."""
        with self._lock:
            last = self._segments[-1].last_seq if self._segments else -1
        self.free_through(last)

    def close(self) -> None:
        self.sync()
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
            self._close_direct()
            flyer, self._flyer = self._flyer, None
        if flyer is not None:
            flyer.shutdown()

    def cursor(self, after_seq: int) -> LogCursor:
        return LogCursor(self, after_seq)

    def _locate(self, seg_first: int, pos: int) -> tuple[_Segment | None, int]:
        """The segment to read next and the position in it (called with the lock held)."""
        # The last segment may have nothing written yet (frames deferred into it): nothing to read.
        for i, seg in enumerate(self._segments):
            if seg.first_seq == seg_first:
                if pos < seg.size:
                    return seg, pos
                if i + 1 < len(self._segments) and self._segments[i + 1].size:
                    return self._segments[i + 1], 0
                return None, pos
            if seg.first_seq > seg_first:
                return (seg, 0) if seg.size else (None, pos)
        return None, pos


class LogCursor:
    """Reads a log's frames after a sequence number, into a caller's reused buffer."""

    def __init__(self, log: SegmentLog, after_seq: int) -> None:
        self._log = log
        self._after = after_seq
        self._seg_first = -1
        self._pos = 0
        self._fd: int | None = None
        self._fd_path: Path | None = None

    def next(self, buf: bytearray) -> tuple[Header, memoryview] | None:
        """The next frame (header, whole frame as a view of `buf`), or None when caught up."""
        view = memoryview(buf)
        while True:
            with self._log._lock:
                seg, pos = self._log._locate(self._seg_first, self._pos)
                if seg is None:
                    return None
                path, end = seg.path, seg.size
                self._seg_first, self._pos = seg.first_seq, pos
            if self._fd_path != path:
                self._close_fd()
                try:
                    self._fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
                except FileNotFoundError:
                    continue  # freed under us; _locate moves on to the next segment
                self._fd_path = path
            assert self._fd is not None
            if end - pos < HEADER_SIZE:
                raise ProtocolError(f"{path} ends inside a frame header at {pos}")
            _pread_exact(self._fd, view[:HEADER_SIZE], pos)
            header = parse_header(view[:HEADER_SIZE])
            total = HEADER_SIZE + header.payload_len
            _pread_exact(self._fd, view[HEADER_SIZE:total], pos + HEADER_SIZE)
            self._pos = pos + total
            if header.seq > self._after:
                self._after = header.seq
                return header, view[:total]

    def _close_fd(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd, self._fd_path = None, None

    def close(self) -> None:
        self._close_fd()


@dataclass
class _Flight:
    """A batch of frames a direct log's writer thread is writing, at the end of `segment`.

    While it flies the export goes on receiving and writing the image; its frames are in no file
    yet, like deferred ones, and promised nothing until a `sync` (which waits for it). It is
    published (size, tail) when written; if the write fails, the segment is cut back, later
    batches are dropped, and the next `settle` raises, so that the owner records every range
    deferred since its last good settle as dirty (one batch may fly past a settle).
    """

    segment: _Segment
    fd: int
    writer: DirectWriter | None
    buf: mmap.mmap
    lead: int  # where the batch starts in `buf` (its file offset modulo ALIGN)
    size: int
    last_seq: int


def _put(
    fd: int, writer: DirectWriter | None, bufs: Sequence[bytes | bytearray | memoryview], at: int, want: int
) -> int:
    """Write `bufs` back to back at `at`; how many bytes went direct, -1 if O_DIRECT was refused.

    With a `writer` (a large write in a direct log) the page-aligned middle goes through its
    O_DIRECT descriptor and the unaligned ends through the page cache. Measured on this VM:
    buffered appends of new data were held to ~400 MiB/s by the kernel's writeback throttling
    once ~3.5 GiB were dirty, so a spool absorbing a burst of 1 MiB writes fell to a third of the
    export's speed; O_DIRECT appends went on at 1.5-2 GB/s. The two never share a page: the middle
    starts and ends on page boundaries, and nothing is cached past the end of a log.
    """
    if writer is not None:
        start, end = -(-at // ALIGN) * ALIGN, (at + want) // ALIGN * ALIGN
        if end > start and writer.fits(start, end - start):
            head, middle, tail = _cut(bufs, start - at, end - at)
            if head:
                pwritev_all(fd, head, at)
            if writer.write(middle, start):
                if tail:
                    pwritev_all(fd, tail, end)
                return end - start
            pwritev_all(fd, [*middle, *tail], start)
            return -1
    pwritev_all(fd, bufs, at)
    return 0


def _cut(
    bufs: Sequence[bytes | bytearray | memoryview], first: int, second: int
) -> tuple[list[memoryview], list[memoryview], list[memoryview]]:
    """The bytes of `bufs`, back to back, as three runs of views: [0, first), [first, second) and
    from `second` on."""
    runs: tuple[list[memoryview], list[memoryview], list[memoryview]] = ([], [], [])
    bounds = (first, second)
    pos = 0
    for buf in bufs:
        view = memoryview(buf).cast("B")
        end = pos + len(view)
        at = pos
        for run, limit in enumerate((*bounds, end)):
            if at < end and at < limit:
                stop = min(end, limit)
                if stop > at:
                    runs[run].append(view[at - pos : stop - pos])
                at = max(at, stop)
        pos = end
    return runs


def _pread_exact(fd: int, view: memoryview, offset: int) -> None:
    got = pread_full(fd, view, offset)
    if got < len(view):
        raise ProtocolError(f"log segment ended early at {offset + got}")


@dataclass(frozen=True)
class _Bad:
    offset: int
    skipped: int
    after_seq: int  # the last intact frame before it in this segment (-1: none)
    resumed_seq: int


@dataclass
class _Scan:
    """What a segment holds: the byte ranges of its intact frames, in order, and what to drop."""

    path: Path
    size: int
    keep: list[tuple[int, int]]  # (start, end) of runs of whole frames
    bad: list[_Bad]  # damage followed by intact frames in this segment
    # Where a tail with no intact frame after it starts: torn (or damage, if a later segment holds
    # frames). A rewrite (`bad`) keeps only `keep`, which never includes it.
    cut_at: int | None
    first: int = -1
    last: int = -1

    def apply(self) -> _Segment | None:
        """Make the file hold exactly its intact frames; None if it holds none."""
        if self.bad:
            tmp = self.path.with_name(self.path.name + _REWRITE)
            with open(self.path, "rb") as src, open(tmp, "wb") as dst:
                for start, end in self.keep:
                    src.seek(start)
                    dst.write(src.read(end - start))
                dst.flush()
                os.fsync(dst.fileno())
            os.replace(tmp, self.path)
        elif self.cut_at is not None:
            os.truncate(self.path, self.cut_at)
        if self.first < 0:
            return None
        return _Segment(self.first, self.last, sum(end - start for start, end in self.keep), self.path)


def _frame_at(data: mmap.mmap | bytes, pos: int, after_seq: int) -> int:
    """Length of the intact frame at `pos` whose sequence follows `after_seq`, or 0."""
    total = _header_frame(data, pos, after_seq)
    return total if total and frame_intact(memoryview(data)[pos : pos + total]) else 0


def _resync(data: mmap.mmap, pos: int, after_seq: int) -> int:
    """The next offset after `pos` where an intact frame following `after_seq` starts, or -1."""
    at = pos
    while True:
        at = data.find(MAGIC, at + 1)
        if at < 0 or _frame_at(data, at, after_seq):
            return at


def _scan(path: Path) -> _Scan:
    """Index a segment file without changing it (`_Scan.apply` does)."""
    size = path.stat().st_size
    scan = _Scan(path, size, [], [], None)
    if size == 0:
        return scan  # rolled, then a crash before its first frame: nothing to keep
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        pos = run = 0
        while pos < size:
            # The header alone decides on the fast path; its payload is verified where it is read.
            total = _header_frame(data, pos, scan.last)
            if total:
                if scan.first < 0:
                    scan.first = _seq(data, pos)
                scan.last = _seq(data, pos)
                pos += total
                continue
            if pos > run:
                scan.keep.append((run, pos))
            resumed = _resync(data, pos, scan.last)
            if resumed < 0:
                scan.cut_at = pos
                break
            scan.bad.append(_Bad(pos, resumed - pos, scan.last, _seq(data, resumed)))
            pos = run = resumed
        else:
            if pos > run:
                scan.keep.append((run, pos))
    return scan


def _header_frame(data: mmap.mmap | bytes, pos: int, after_seq: int) -> int:
    """Length of the frame at `pos` if its header verifies and the whole frame is in the file."""
    if pos + HEADER_SIZE > len(data):
        return 0
    try:
        h = parse_header(data[pos : pos + HEADER_SIZE])
    except ProtocolError:
        return 0
    total = HEADER_SIZE + h.payload_len
    return total if h.seq > after_seq and pos + total <= len(data) else 0


def _seq(data: mmap.mmap, pos: int) -> int:
    return parse_header(data[pos : pos + HEADER_SIZE]).seq
