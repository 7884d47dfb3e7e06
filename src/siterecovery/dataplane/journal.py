"""The master target's retention journal: a target disk at the newest state plus undo history.

`JournaledDisk` implements the `DiskApplier` seam (see `apply.py`). The target image always holds
the newest applied state; for every write the journal keeps what it replaced (an undo record) in
append-only segment files on the retention volume, for the retention window. Recovery points are
records in the same stream, so they vanish with the history they need. Materialising a point
rolls the disk back in place (saving what it overwrites as redo, so the operator may change the
point before committing) or into a sparse copy; "latest" costs nothing.

Durability is write-ahead: an undo record is fsynced before the disk bytes it protects are
overwritten, and `sync()` ends with a fsynced commit record naming the applied sequence. On open,
records after the last commit are rolled back onto the disk and cut off, which returns the disk to
exactly the acknowledged state; the sender then resends what was never acknowledged. The on-disk
format and the argument are in docs/journal.md. One instance is driven by one task at a time.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
import time
from array import array
from bisect import bisect_left, bisect_right
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from enum import IntEnum, StrEnum
from pathlib import Path

import xxhash

from siterecovery.dataplane.apply import ApplierFactory, DiskApplier, punch_or_zero
from siterecovery.dataplane.points import CrashPointPolicy, PointKind, RecoveryPoint, disk_point
from siterecovery.errors import Problem, SiteRecoveryError, Status, recovery_point_unusable

# Record: magic, kind, point kind, reserved, seq, time, offset, length, payload length, checksum.
# The checksum (xxh3-64) covers the header before it and the payload, so a torn tail is detected.
_REC = struct.Struct("<4sBBHqdQQQQ")
_REC_MAGIC = b"SRJR"
_CSUM_AT = _REC.size - 8
# File header of a segment / the redo log: magic, segment index, base seq (committed at creation).
_FILE_HDR = struct.Struct("<8sQq")
_SEG_MAGIC = b"SRJSEG01"
_REDO_MAGIC = b"SRJREDO1"
# Position file: magic, state, from seq, to seq, redo mark (length of the redo log that is valid).
_POS = struct.Struct("<8sBqqQ")
_POS_MAGIC = b"SRJPOS01"

_IO = 4 << 20  # largest single read/copy; also the journal write-buffer flush threshold
_ZEROS = memoryview(bytes(_IO))
_FICLONE = 0x40049409
_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
_NO_LIMIT = 1 << 62


class _Kind(IntEnum):
    DATA = 1  # payload = the bytes the write replaced (undo) or the newer bytes (redo)
    ZERO = 2  # the range read as zeroes; no payload
    POINT = 3  # payload = tag; `length` unused
    COMMIT = 4  # everything up to seq is durable on the disk


_POINT_CODE = {PointKind.CRASH: 1, PointKind.APP: 2, PointKind.GROUP: 3}
_CODE_POINT = {v: k for k, v in _POINT_CODE.items()}


class _Pos(IntEnum):
    LATEST = 0
    AT = 1
    MOVING_BACK = 2
    MOVING_FORWARD = 3


class CopyMethod(StrEnum):
    NONE = "none"  # in place, nothing copied
    REFLINK = "reflink"
    COPY_FILE_RANGE = "copy_file_range"


@dataclass(frozen=True)
class MaterialiseResult:
    """What materialising a point cost: data bytes copied or rewritten, and undo/redo records used."""

    point_id: str
    seq: int
    method: CopyMethod
    bytes_copied: int
    bytes_rewritten: int
    records: int

    @property
    def bytes_moved(self) -> int:
        return self.bytes_copied + self.bytes_rewritten


@dataclass(slots=True)
class _Segment:
    index: int
    path: Path
    base_seq: int
    size: int
    last_seq: int
    last_time: float


class _VolumeFull(Exception):
    def __init__(self, volume: str, err: OSError | None) -> None:
        super().__init__(volume)
        self.volume = volume
        self.err = err


class _Pending:
    """Disk writes whose undo records are journaled but not yet fsynced: disjoint, sorted by offset.

    Holding them back until the journal is durable is the write-ahead rule; an overlapping write
    merges into the range it overlaps, so reading "old bytes" sees every earlier write.
    """

    __slots__ = ("bufs", "nbytes", "starts")

    def __init__(self) -> None:
        self.starts: list[int] = []
        self.bufs: list[bytearray] = []
        self.nbytes = 0

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

    def add(self, off: int, data: memoryview) -> None:
        end = off + len(data)
        i, j = self._span(off, end)
        if i == j:
            self.starts.insert(i, off)
            self.bufs.insert(i, bytearray(data))
            self.nbytes += len(data)
            return
        lo = min(off, self.starts[i])
        hi = max(end, self.starts[j - 1] + len(self.bufs[j - 1]))
        if j == i + 1 and lo == self.starts[i] and hi == lo + len(self.bufs[i]):
            self.bufs[i][off - lo : end - lo] = data
            return
        merged = bytearray(hi - lo)
        for k in range(i, j):
            s, b = self.starts[k], self.bufs[k]
            merged[s - lo : s - lo + len(b)] = b
            self.nbytes -= len(b)
        merged[off - lo : end - lo] = data
        self.starts[i:j] = [lo]
        self.bufs[i:j] = [merged]
        self.nbytes += len(merged)

    def drain(self, fd: int) -> None:
        """Write everything, one pwritev per run of adjacent ranges."""
        k, n = 0, len(self.starts)
        while k < n:
            run_end = k + 1
            while (
                run_end < n
                and run_end - k < 1024
                and self.starts[run_end] == self.starts[run_end - 1] + len(self.bufs[run_end - 1])
            ):
                run_end += 1
            _pwritev_all(fd, self.bufs[k:run_end], self.starts[k])
            k = run_end
        self.starts.clear()
        self.bufs.clear()
        self.nbytes = 0


def _pwritev_all(fd: int, bufs: list[bytearray], offset: int) -> None:
    total = sum(len(b) for b in bufs)
    done = os.pwritev(fd, bufs, offset)
    if done == total:
        return
    # A short vectored write is rare on regular files; finish piece by piece.
    pos = offset
    for b in bufs:
        view = memoryview(b)
        end = pos + len(b)
        start = max(pos, offset + done)
        while start < end:
            start += os.pwrite(fd, view[start - pos :], start)
        pos = end


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    done = 0
    while done < len(data):
        done += os.pwrite(fd, data[done:], offset + done)


def _pread_full(fd: int, view: memoryview, offset: int) -> None:
    """Fill `view` from `offset`; bytes past the end of the file read as zeroes."""
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n == 0:
            view[done:] = _ZEROS[: len(view) - done]
            return
        done += n


def _is_zero(buf: bytearray, n: int) -> bool:
    """True if buf[:n] is all zeroes (memcmp against a zero buffer, no copy)."""
    return all(buf.startswith(_ZEROS[: min(_IO, n - at)], at) for at in range(0, n, _IO))


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


def _has_data(fd: int, offset: int, length: int) -> bool:
    try:
        return os.lseek(fd, offset, os.SEEK_DATA) < offset + length
    except OSError as exc:
        if exc.errno == errno.ENXIO:
            return False
        raise


def _data_extents(fd: int, offset: int, length: int) -> Iterator[tuple[int, int]]:
    """Allocated ranges inside [offset, offset+length) (SEEK_DATA/SEEK_HOLE); holes are skipped."""
    end = offset + length
    pos = offset
    while pos < end:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:
                return
            raise
        if start >= end:
            return
        stop = min(os.lseek(fd, start, os.SEEK_HOLE), end)
        yield start, stop - start
        pos = stop


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _commit_follows(fd: int, at: int, limit: int) -> bool:
    """A verified commit record comes after `at` (so a bad record before it is not a torn tail)."""
    probe = _Record()
    while probe.read(fd, at, limit, verify=True):
        if probe.kind == _Kind.COMMIT:
            return True
        at += probe.end_delta
    return False


def _checksum(hdr: memoryview, payload: memoryview | bytes) -> int:
    h = xxhash.xxh3_64(hdr[:_CSUM_AT])
    h.update(payload)
    return h.intdigest()


class _Record:
    """A reusable record reader: one header buffer and one growing payload buffer per journal."""

    __slots__ = ("buf", "kind", "length", "offset", "payload", "pcode", "plen", "seq", "time")

    def __init__(self) -> None:
        self.buf = bytearray(_REC.size + _IO)
        self.kind = 0
        self.pcode = 0
        self.seq = 0
        self.time = 0.0
        self.offset = 0
        self.length = 0
        self.plen = 0
        self.payload = memoryview(self.buf)[_REC.size : _REC.size]

    def read(self, fd: int, at: int, limit: int, *, verify: bool, header_only: bool = False) -> bool:
        """Parse the record at `at`; False if it is absent, torn or fails its checksum.

        With header_only (and no verify) the payload is not read and `payload` is stale.
        """
        if at + _REC.size > limit:
            return False
        view = memoryview(self.buf)
        if os.preadv(fd, [view[: _REC.size]], at) != _REC.size:
            return False
        magic, kind, pcode, _r, seq, t, offset, length, plen, csum = _REC.unpack_from(self.buf)
        if magic != _REC_MAGIC or kind not in (1, 2, 3, 4) or at + _REC.size + plen > limit:
            return False
        self.kind, self.pcode, self.seq, self.time = kind, pcode, seq, t
        self.offset, self.length, self.plen = offset, length, plen
        if header_only and not verify:
            return True
        if len(self.buf) < _REC.size + plen:
            self.buf = bytearray(_REC.size + plen)
            self.buf[: _REC.size] = view[: _REC.size]
            view = memoryview(self.buf)
        self.payload = view[_REC.size : _REC.size + plen]
        if plen and os.preadv(fd, [self.payload], at + _REC.size) != plen:
            return False
        return not verify or _checksum(view, self.payload) == csum

    @property
    def end_delta(self) -> int:
        return _REC.size + self.plen


class JournaledDisk(DiskApplier):
    """A target disk image plus its retention journal; implements the `DiskApplier` seam."""

    def __init__(
        self,
        target: Path,
        journal_dir: Path,
        retention_seconds: float,
        *,
        name: str | None = None,
        size: int | None = None,
        quota_bytes: int | None = None,
        crash_points: CrashPointPolicy | None = None,
        clock: Callable[[], float] = time.time,
        segment_bytes: int = 256 << 20,
        pending_limit: int = 64 << 20,
    ) -> None:
        self.target = target
        self.journal_dir = journal_dir
        self.retention_seconds = retention_seconds
        self._name = name or target.name
        self.quota_bytes = quota_bytes
        self.crash_points = crash_points if crash_points is not None else CrashPointPolicy()
        self._clock = clock
        self._segment_bytes = segment_bytes
        # Time-based rotation keeps pruning granular: a segment never spans more than 1/8 window.
        self._segment_seconds = max(retention_seconds / 8, 1e-3)
        self._pending_limit = pending_limit
        self.paused: Problem | None = None

        journal_dir.mkdir(parents=True, exist_ok=True)
        self._lock_fd = os.open(journal_dir / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            raise SiteRecoveryError(
                Problem(
                    code="journal-in-use",
                    message=f"The journal {journal_dir} of disk {self._name!r} is open elsewhere.",
                    remediation="Stop the other master target process using this retention volume.",
                )
            ) from None
        self._disk = os.open(target, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        if size is not None and os.fstat(self._disk).st_size < size:
            os.ftruncate(self._disk, size)

        self._rec = _Record()
        self._rbuf = bytearray(1 << 20)
        self._hdr = bytearray(_REC.size)
        self._jbuf = bytearray()
        self._pending = _Pending()
        self._seg_start_time = 0.0
        self._segments: list[_Segment] = []
        self._read_fds: dict[int, int] = {}
        self._seg_fd = -1
        self._commit_end = 0  # end offset of the last commit record in the active segment
        self._points: list[RecoveryPoint] = []
        self._seq = -1
        self._committed = -1
        self._commit_time = 0.0
        self._last_point_time = float("-inf")
        self._last_point_seq = -1
        self._redo_fd = -1
        self._redo_end = 0
        self._position = _Pos.LATEST
        self._pos_seq = -1
        # Points before this sequence need an undo record that failed its checksum (`_check_undo`).
        damaged = journal_dir / "damaged"
        self.damaged_below = int(damaged.read_text()) if damaged.exists() else -1
        self._open()

    # ---- the DiskApplier seam ---------------------------------------------------------------

    @property
    def name(self) -> str:
        return self._name

    @property
    def applied_seq(self) -> int:
        return self._seq

    @property
    def committed_seq(self) -> int:
        return self._committed

    def apply_write(self, seq: int, offset: int, data: memoryview) -> None:
        if seq <= self._seq:
            return
        self._require_latest()
        n = len(data)
        self._check_quota(seq, _REC.size * 3 + n)
        now = self._clock()
        try:
            if n:
                old = self._read_old(offset, n)
                if old is None:
                    self._append(_Kind.ZERO, seq, now, offset, n, b"")
                else:
                    self._append(_Kind.DATA, seq, now, offset, n, old)
                self._pending.add(offset, data)
            self._seq = seq
            if self._pending.nbytes >= self._pending_limit:
                self._flush_pending()
        except _VolumeFull as full:
            raise self._abort(full, seq) from full.err

    def apply_zero(self, seq: int, offset: int, length: int) -> None:
        if seq <= self._seq:
            return
        self._require_latest()
        now = self._clock()
        try:
            if self._pending.overlaps(offset, offset + length):
                self._flush_pending()
            extents = list(_data_extents(self._disk, offset, length))
            self._check_quota(seq, _REC.size * (3 + len(extents)) + sum(n for _, n in extents))
            changed = False
            for start, n in extents:
                for chunk in range(start, start + n, _IO):
                    m = min(_IO, start + n - chunk)
                    view = memoryview(self._rbuf)[:m] if m <= len(self._rbuf) else self._grow(m)
                    _pread_full(self._disk, view, chunk)
                    if not _is_zero(self._rbuf, m):
                        self._append(_Kind.DATA, seq, now, chunk, m, view)
                        changed = True
            if changed:
                # Write-ahead: the undo records must be durable before the bytes disappear.
                self._write_jbuf(sync=True)
                self._disk_io(punch_or_zero, offset, length)
            self._seq = seq
        except _VolumeFull as full:
            raise self._abort(full, seq) from full.err

    def bookmark(self, seq: int, tag: str, kind: str, timestamp: float) -> None:
        """A point from the stream (app-consistent or group tag): the cut is the bookmark's seq."""
        if seq <= self._seq:
            return
        self._require_latest()
        pkind = PointKind(kind)
        if pkind is PointKind.LATEST:
            raise SiteRecoveryError(
                Problem(
                    code="invalid-input",
                    message=f"Bookmark {tag!r} on disk {self._name!r} cannot be of kind 'latest'.",
                    remediation="Send crash, app or group bookmarks; 'latest' is always available.",
                ),
                Status.UNPROCESSABLE,
            )
        self._check_quota(seq, _REC.size * 3 + len(tag.encode()))
        try:
            self._append_point(pkind, seq, timestamp, tag)
        except _VolumeFull as full:
            raise self._abort(full, seq) from full.err
        self._seq = seq

    def sync(self) -> None:
        """Make everything applied durable: journal, then disk, then a fsynced commit record."""
        if self._seq == self._committed and not self._jbuf and not self._pending.nbytes:
            self._prune()
            return
        now = self._clock()
        try:
            self._flush_pending()
            self._disk_io(os.fdatasync)
            if self.crash_points.due(now, self._last_point_time, self._last_point_seq, self._seq):
                self._append_point(PointKind.CRASH, self._seq, now, "")
            self._append(_Kind.COMMIT, self._seq, now, 0, 0, b"")
            self._write_jbuf(sync=True)
        except _VolumeFull as full:
            raise self._abort(full, self._seq) from full.err
        self._committed = self._seq
        self._commit_time = now
        self._commit_end = self._segments[-1].size
        self.paused = None
        seg = self._segments[-1]
        if seg.size >= self._segment_bytes or now - self._seg_start_time >= self._segment_seconds:
            self._new_segment()
        self._prune()

    def take_crash_point(self) -> RecoveryPoint:
        """A crash-consistent point at everything applied so far (made durable by a sync)."""
        self._require_latest()
        if self._last_point_seq < self._seq or not self._points:
            self._check_quota(self._seq, _REC.size * 3)
            try:
                self._append_point(PointKind.CRASH, self._seq, self._clock(), "")
            except _VolumeFull as full:
                raise self._abort(full, self._seq) from full.err
        self.sync()
        return self._points[-1]

    def close(self) -> None:
        self._close_read_fds()
        for fd in (self._seg_fd, self._redo_fd, self._disk, self._lock_fd):
            if fd >= 0:
                os.close(fd)
        self._seg_fd = self._redo_fd = self._disk = self._lock_fd = -1

    def __enter__(self) -> JournaledDisk:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- points and space -------------------------------------------------------------------

    def set_retention(self, seconds: float) -> None:
        """Change the retention window (the policy changed); pruning follows on the next sync."""
        self.retention_seconds = seconds
        self._segment_seconds = max(seconds / 8, 1e-3)

    @property
    def journal_bytes(self) -> int:
        """Space the journal uses on the retention volume (segments, redo log, unwritten buffer)."""
        return sum(s.size for s in self._segments) + self._redo_end + len(self._jbuf)

    @property
    def oldest_restorable_seq(self) -> int:
        return self._segments[0].base_seq

    def points(self) -> list[RecoveryPoint]:
        """Committed points inside the retention window whose undo history is still kept."""
        horizon = self._clock() - self.retention_seconds
        floor = self.oldest_restorable_seq
        return [p for p in self._points if p.time >= horizon and floor <= p.cut[0].seq <= self._committed]

    def latest_point(self) -> RecoveryPoint:
        return disk_point(self._name, PointKind.LATEST, self._committed, self._commit_time)

    @property
    def at_latest(self) -> bool:
        """True unless the disk is rolled back in place (replicated writes are then refused)."""
        return self._position is _Pos.LATEST

    @property
    def position_seq(self) -> int:
        """The sequence the disk currently represents (the committed seq unless rolled back)."""
        return self._committed if self._position is _Pos.LATEST else self._pos_seq

    # ---- materialising points ---------------------------------------------------------------

    def materialise_in_place(self, point: RecoveryPoint) -> MaterialiseResult:
        target = point.seq_for(self._name)
        if target <= self.position_seq:
            return self.rollback_to(point)
        return self.roll_forward_to(point)

    def rollback_to(self, point: RecoveryPoint) -> MaterialiseResult:
        """Undo every write newer than the point, in reverse, saving the newer bytes as redo."""
        self.sync()
        to = self._point_seq(point)
        frm = self.position_seq
        if to > frm:
            raise self._direction_error(point, "roll_forward_to")
        if to == frm:
            return MaterialiseResult(point.id, to, CopyMethod.NONE, 0, 0, 0)
        self._check_undo(point, to, frm)
        self._write_position(_Pos.MOVING_BACK, frm, to, self._redo_end)
        try:
            moved, records = self._move_back(frm, to, self._redo_end)
        finally:
            self._close_read_fds()
        return MaterialiseResult(point.id, to, CopyMethod.NONE, 0, moved, records)

    def roll_forward_to(self, point: RecoveryPoint) -> MaterialiseResult:
        """Re-apply the saved redo up to the point (up to latest makes the disk current again)."""
        to = self._point_seq(point)
        frm = self.position_seq
        if to < frm:
            raise self._direction_error(point, "rollback_to")
        if to == frm:
            if to >= self._committed and self._position is not _Pos.LATEST:
                # Rolled "back" to the newest sequence: nothing to re-apply, but writes may resume.
                self._write_position(_Pos.LATEST, to, to, self._redo_end)
            return MaterialiseResult(point.id, to, CopyMethod.NONE, 0, 0, 0)
        self._write_position(_Pos.MOVING_FORWARD, frm, to, self._redo_end)
        moved, records = self._move_forward(frm, to)
        return MaterialiseResult(point.id, to, CopyMethod.NONE, 0, moved, records)

    def materialise_copy(self, point: RecoveryPoint, out_path: Path) -> MaterialiseResult:
        """A new sparse image at the point (test failover, disposable copies); the disk is untouched."""
        self.sync()
        to = self._point_seq(point)
        frm = self.position_seq
        if to < frm:
            self._check_undo(point, to, frm)
        out = os.open(out_path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            method, copied = self._clone(out)
            moved = records = 0
            if to < frm:
                for rec_fd, at, _seq in self._undo_stream(to, frm):
                    moved += self._restore(rec_fd, at, out)
                    records += 1
            elif to > frm:
                for at in self._redo_stream(frm, to):
                    moved += self._restore(self._redo_fd, at, out)
                    records += 1
            os.fsync(out)
        finally:
            os.close(out)
            self._close_read_fds()
        return MaterialiseResult(point.id, to, method, copied, moved, records)

    # ---- internals: appending and flushing --------------------------------------------------

    def _append(
        self, kind: _Kind, seq: int, t: float, offset: int, length: int, payload: memoryview | bytes
    ) -> None:
        self._pack(kind, 0, seq, t, offset, length, payload)

    def _append_point(self, pkind: PointKind, seq: int, t: float, tag: str) -> None:
        self._pack(_Kind.POINT, _POINT_CODE[pkind], seq, t, 0, 0, tag.encode())
        self._points.append(disk_point(self._name, pkind, seq, t, tag))
        # The crash timer counts from when any point was recorded, whatever time the agent stamped.
        self._last_point_time = self._clock()
        self._last_point_seq = max(self._last_point_seq, seq)

    def _pack(
        self, kind: int, pcode: int, seq: int, t: float, offset: int, length: int, payload: memoryview | bytes
    ) -> None:
        hdr = self._hdr
        _REC.pack_into(hdr, 0, _REC_MAGIC, kind, pcode, 0, seq, t, offset, length, len(payload), 0)
        struct.pack_into("<Q", hdr, _CSUM_AT, _checksum(memoryview(hdr), payload))
        self._jbuf += hdr
        self._jbuf += payload
        seg = self._segments[-1]
        seg.last_seq = max(seg.last_seq, seq)
        seg.last_time = max(seg.last_time, self._clock())
        if len(self._jbuf) >= _IO:
            self._write_jbuf(sync=False)

    def _write_jbuf(self, *, sync: bool) -> None:
        seg = self._segments[-1]
        if self._jbuf:
            if self.quota_bytes is not None and self.journal_bytes > self.quota_bytes:
                raise _VolumeFull("retention", None)
            try:
                _pwrite_all(self._seg_fd, memoryview(self._jbuf), seg.size)
            except OSError as exc:
                if exc.errno in _FULL_ERRNOS:
                    # Without its traceback: the frames hold views of _jbuf, which _abort clears
                    # (a BufferError there killed the apply thread with no pause and no alert).
                    raise _VolumeFull("retention", exc.with_traceback(None)) from None
                raise
            seg.size += len(self._jbuf)
            self._jbuf.clear()
        if sync:
            try:
                os.fdatasync(self._seg_fd)
            except OSError as exc:
                if exc.errno in _FULL_ERRNOS:
                    raise _VolumeFull("retention", exc) from exc
                raise

    def _flush_pending(self) -> None:
        if not self._pending.nbytes:
            self._write_jbuf(sync=False)
            return
        self._write_jbuf(sync=True)
        self._disk_io(self._pending.drain)

    def _disk_io(self, fn: Callable[..., None], *args: int) -> None:
        try:
            fn(self._disk, *args)
        except OSError as exc:
            if exc.errno in _FULL_ERRNOS:
                raise _VolumeFull("target", exc) from exc
            raise

    def _grow(self, n: int) -> memoryview:
        self._rbuf = bytearray(n)
        return memoryview(self._rbuf)

    def _read_old(self, offset: int, n: int) -> memoryview | None:
        """The bytes a write at offset replaces, or None when they all read as zeroes."""
        in_pending = self._pending.overlaps(offset, offset + n)
        if not in_pending and not _has_data(self._disk, offset, n):
            return None
        view = memoryview(self._rbuf)[:n] if n <= len(self._rbuf) else self._grow(n)
        _pread_full(self._disk, view, offset)
        if in_pending:
            self._pending.overlay(offset, view)
        return None if _is_zero(self._rbuf, n) else view

    def _check_quota(self, seq: int, need: int) -> None:
        if self.quota_bytes is None or self.journal_bytes + need <= self.quota_bytes:
            return
        self._prune()
        if self.journal_bytes + need <= self.quota_bytes:
            return
        self.paused = self._full_problem("retention", seq, None)
        raise SiteRecoveryError(self.paused, Status.UNAVAILABLE)

    def _full_problem(self, volume: str, seq: int, err: OSError | None) -> Problem:
        where = self.journal_dir if volume == "retention" else self.target
        return Problem(
            code=f"{volume}-volume-full",
            message=f"The {volume} volume holding {where} for disk {self._name!r} is full; applying "
            f"is paused at sequence {self._committed} (write {seq} was not applied).",
            remediation="Free space on the volume, enlarge it or shorten the retention window; "
            "applying resumes by itself and catches up from the unacknowledged writes.",
            detail={
                "disk": self._name,
                "volume": str(where),
                "seq": seq,
                "applied_seq": self._committed,
                "journal_bytes": self.journal_bytes,
                "quota_bytes": self.quota_bytes,
                "error": err.strerror if err else "quota reached",
            },
        )

    def _abort(self, full: _VolumeFull, seq: int) -> SiteRecoveryError:
        """A volume filled mid-batch: undo the unacknowledged batch so disk and journal agree."""
        self._jbuf.clear()
        self._pending = _Pending()
        self._rollback_uncommitted()
        self.paused = self._full_problem(full.volume, seq, full.err)
        return SiteRecoveryError(self.paused, Status.UNAVAILABLE)

    # ---- internals: opening, recovery, segments ---------------------------------------------

    def _open(self) -> None:
        names = sorted(p for p in self.journal_dir.glob("seg-*.jnl"))
        for path in names:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                head = os.pread(fd, _FILE_HDR.size, 0)
                if len(head) < _FILE_HDR.size or head[:8] != _SEG_MAGIC:
                    if path == names[-1]:
                        # A segment created but torn before its header was durable holds nothing.
                        os.unlink(path)
                        continue
                    raise self._corrupt(path, "bad segment header")
                _m, index, base = _FILE_HDR.unpack(head)
                self._segments.append(_Segment(index, path, base, os.fstat(fd).st_size, base, float("-inf")))
            finally:
                os.close(fd)
        if not self._segments:
            self._new_segment(base_seq=-1)
        else:
            self._seq = self._committed = self._segments[-1].base_seq
            for seg in self._segments:
                self._scan(seg, last=seg is self._segments[-1])
            self._seg_fd = os.open(self._segments[-1].path, os.O_RDWR | os.O_CLOEXEC)
            self._rollback_uncommitted()
            self._seg_start_time = self._clock()
        self._open_redo()
        self._resume_position()

    def _scan(self, seg: _Segment, *, last: bool) -> None:
        """Read a segment's records for points and seqs; checksums are checked in the active one.

        Points count only once a later commit record makes them durable; sealed segments always
        end with a commit, the active one may end with an unacknowledged tail.
        """
        fd = os.open(seg.path, os.O_RDONLY | os.O_CLOEXEC)
        rec = self._rec
        at = _FILE_HDR.size
        if last:
            self._commit_end = at
        uncommitted: list[RecoveryPoint] = []
        try:
            while True:
                damaged = False
                if not rec.read(fd, at, seg.size, verify=last, header_only=True):
                    # Torn tail, or one record damaged in place: only then does a verified commit
                    # follow it. Damage is remembered (its points become unusable), not cut off:
                    # cutting would drop committed records and serve older points silently wrong.
                    if not (last and rec.read(fd, at, seg.size, verify=False, header_only=True)):
                        break
                    if not _commit_follows(fd, at + rec.end_delta, seg.size):
                        break
                    damaged = True
                    self._note_damage(rec.seq)
                if rec.kind == _Kind.POINT and not last and not rec.read(fd, at, seg.size, verify=True):
                    break
                at += rec.end_delta
                if damaged and rec.kind == _Kind.POINT:
                    continue  # its tag is unreadable: the point is lost
                seg.last_seq = max(seg.last_seq, rec.seq)
                seg.last_time = max(seg.last_time, rec.time)
                if rec.kind == _Kind.COMMIT:
                    self._seq = self._committed = rec.seq
                    self._commit_time = rec.time
                    if last:
                        self._commit_end = at
                    self._points.extend(uncommitted)
                    uncommitted.clear()
                elif rec.kind == _Kind.POINT:
                    tag = bytes(rec.payload).decode()
                    uncommitted.append(disk_point(self._name, _CODE_POINT[rec.pcode], rec.seq, rec.time, tag))
                    self._last_point_seq = max(self._last_point_seq, rec.seq)
                    self._last_point_time = max(self._last_point_time, rec.time)
        finally:
            os.close(fd)
        if at != seg.size and not last:
            raise self._corrupt(seg.path, f"unreadable record at offset {at}")

    def _rollback_uncommitted(self) -> None:
        """Undo records after the last commit (their disk writes may or may not have landed)."""
        seg = self._segments[-1]
        records: list[int] = []
        at = self._commit_end
        while self._rec.read(self._seg_fd, at, seg.size, verify=True, header_only=True):
            if self._rec.kind in (_Kind.DATA, _Kind.ZERO):
                records.append(at)
            at += self._rec.end_delta
        for rat in reversed(records):
            self._restore(self._seg_fd, rat, self._disk)
        if records:
            os.fdatasync(self._disk)
        if seg.size != self._commit_end:
            os.ftruncate(self._seg_fd, self._commit_end)
            os.fsync(self._seg_fd)
            seg.size = self._commit_end
        self._seq = self._committed
        self._points = [p for p in self._points if p.cut[0].seq <= self._committed]
        self._last_point_seq = max((p.cut[0].seq for p in self._points), default=-1)

    def _restore(self, rec_fd: int, at: int, out_fd: int) -> int:
        """Apply one DATA/ZERO record's content at its range in `out_fd`; returns bytes written."""
        rec = self._rec
        if not rec.read(rec_fd, at, _NO_LIMIT, verify=True):
            raise self._corrupt(self.journal_dir, f"record at offset {at} fails its checksum")
        if rec.kind == _Kind.ZERO:
            punch_or_zero(out_fd, rec.offset, rec.length)
        else:
            _pwrite_all(out_fd, rec.payload, rec.offset)
        return rec.length

    def _check_undo(self, point: RecoveryPoint, to: int, frm: int) -> None:
        """Refuse a point whose way back crosses a damaged undo record, before the disk changes.

        Every undo record in (to, frm] is verified first (one extra read of what the move reads):
        a damaged one makes this point, and every older one, unusable rather than served half
        restored. The sequence is remembered (`damaged_below`) so the points are listed so.
        """
        bad = None
        try:
            for fd, at, seq in self._undo_stream(to, frm):
                if not self._rec.read(fd, at, _NO_LIMIT, verify=True):
                    bad = seq
                    break
        finally:
            self._close_read_fds()
        if bad is None:
            return
        self._note_damage(bad)
        raise recovery_point_unusable(
            point.id, self._name, f"its undo record at sequence {bad} fails its checksum", bad
        )

    def _note_damage(self, seq: int) -> None:
        if seq > self.damaged_below:
            self.damaged_below = seq
            tmp = self.journal_dir / "damaged.tmp"
            tmp.write_text(str(seq))
            os.replace(tmp, self.journal_dir / "damaged")

    def _new_segment(self, base_seq: int | None = None) -> None:
        base = self._committed if base_seq is None else base_seq
        index = self._segments[-1].index + 1 if self._segments else 1
        path = self.journal_dir / f"seg-{index:012d}.jnl"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.pwrite(fd, _FILE_HDR.pack(_SEG_MAGIC, index, base), 0)
            os.fsync(fd)
            _fsync_dir(self.journal_dir)
        except OSError as exc:
            os.close(fd)
            os.unlink(path)
            if exc.errno in _FULL_ERRNOS and self._segments:
                return  # rotation is an optimisation: keep appending to the current segment
            raise
        if self._seg_fd >= 0:
            os.close(self._seg_fd)
        self._seg_fd = fd
        self._segments.append(_Segment(index, path, base, _FILE_HDR.size, base, self._clock()))
        self._commit_end = _FILE_HDR.size
        self._seg_start_time = self._clock()

    def _prune(self) -> None:
        """Drop the oldest sealed segments whose every record is older than the window."""
        horizon = self._clock() - self.retention_seconds
        dropped = False
        while len(self._segments) > 1 and self._segments[0].last_time < horizon:
            os.unlink(self._segments.pop(0).path)
            dropped = True
        if dropped:
            floor = self.oldest_restorable_seq
            self._points = [p for p in self._points if p.cut[0].seq >= floor]

    def _corrupt(self, path: Path, why: str) -> SiteRecoveryError:
        return SiteRecoveryError(
            Problem(
                code="journal-corrupt",
                message=f"The retention journal {path} of disk {self._name!r} is damaged: {why}.",
                remediation="Restore the retention volume or resynchronise the disk; recovery "
                "points older than the damage cannot be materialised.",
                detail={"path": str(path), "reason": why},
            ),
            Status.CONFLICT,
        )

    # ---- internals: moving the disk between points ------------------------------------------

    def _point_seq(self, point: RecoveryPoint) -> int:
        seq = point.seq_for(self._name)
        if point.kind is not PointKind.LATEST and (seq < self.oldest_restorable_seq or seq > self._committed):
            raise SiteRecoveryError(
                Problem(
                    code="recovery-point-unavailable",
                    message=f"Recovery point {point.id!r} of disk {self._name!r} is no longer retained.",
                    remediation="List the recovery points and choose one inside the retention window.",
                    detail={"point": point.id, "oldest_restorable_seq": self.oldest_restorable_seq},
                ),
                Status.NOT_FOUND,
            )
        return seq

    def _direction_error(self, point: RecoveryPoint, use: str) -> SiteRecoveryError:
        return SiteRecoveryError(
            Problem(
                code="invalid-input",
                message=f"Disk {self._name!r} is at sequence {self.position_seq}; point {point.id!r} "
                f"is on the other side.",
                remediation=f"Use {use}() for this point.",
            ),
            Status.UNPROCESSABLE,
        )

    def _require_latest(self) -> None:
        if self._position is not _Pos.LATEST:
            raise SiteRecoveryError(
                Problem(
                    code="disk-not-at-latest",
                    message=f"Disk {self._name!r} is rolled back to sequence {self._pos_seq}; "
                    "replicated writes cannot be applied to it.",
                    remediation="Roll the disk forward to the latest point before replication resumes.",
                    detail={"disk": self._name, "position_seq": self._pos_seq},
                ),
                Status.CONFLICT,
            )

    def _undo_stream(self, lo: int, hi: int) -> Iterator[tuple[int, int, int]]:
        """(fd, offset, seq) of DATA/ZERO undo records with lo < seq <= hi, newest first.

        Segment descriptors stay open (cached) until the move ends: batches outlive the iteration.
        """
        for seg in reversed(self._segments):
            if seg.last_seq <= lo:
                break
            fd = self._read_fds.get(seg.index)
            if fd is None:
                fd = self._read_fds[seg.index] = os.open(seg.path, os.O_RDONLY | os.O_CLOEXEC)
            offsets = array("Q")
            seqs = array("q")
            at = _FILE_HDR.size
            end = self._commit_end if seg is self._segments[-1] else seg.size
            while self._rec.read(fd, at, end, verify=False, header_only=True):
                if self._rec.kind in (_Kind.DATA, _Kind.ZERO) and lo < self._rec.seq <= hi:
                    offsets.append(at)
                    seqs.append(self._rec.seq)
                at += self._rec.end_delta
            for k in range(len(offsets) - 1, -1, -1):
                yield fd, offsets[k], seqs[k]

    def _close_read_fds(self) -> None:
        for fd in self._read_fds.values():
            os.close(fd)
        self._read_fds.clear()

    def _redo_stream(self, lo: int, hi: int) -> Iterator[int]:
        """Offsets of redo records with lo < seq <= hi, oldest seq first (the log's tail, reversed)."""
        offsets = array("Q")
        seqs = array("q")
        at = _FILE_HDR.size
        while self._rec.read(self._redo_fd, at, self._redo_end, verify=False, header_only=True):
            offsets.append(at)
            seqs.append(self._rec.seq)
            at += self._rec.end_delta
        for k in range(len(offsets) - 1, -1, -1):
            if seqs[k] > hi:
                break
            if seqs[k] > lo:
                yield offsets[k]

    def _move_back(self, frm: int, to: int, mark: int) -> tuple[int, int]:
        """Roll the disk from `frm` back to `to`; redo captured after `mark` is reused on resume.

        Undo records go in batches of disjoint ranges: for each batch the bytes about to be
        overwritten are appended to the redo log and fsynced first (write-ahead again), so a crash
        mid-way leaves a redo log that replaying the whole move from `frm` can complete.
        """
        captured = self._valid_redo_after(mark)
        moved = records = 0
        batch: list[tuple[int, int, int]] = []
        ranges = _Ranges()
        batch_bytes = 0
        for ordinal, (fd, at, seq) in enumerate(self._undo_stream(to, frm)):
            records += 1
            if ordinal < captured:
                moved += self._restore(fd, at, self._disk)
                continue
            self._rec.read(fd, at, _NO_LIMIT, verify=False, header_only=True)
            off, end = self._rec.offset, self._rec.offset + self._rec.length
            full = batch_bytes >= self._pending_limit or len(batch) >= 4096
            if batch and (full or ranges.overlaps(off, end)):
                moved += self._run_back_batch(batch)
                batch, ranges, batch_bytes = [], _Ranges(), 0
            batch.append((fd, at, seq))
            ranges.add(off, end)
            batch_bytes += end - off
        if batch:
            moved += self._run_back_batch(batch)
        os.fdatasync(self._disk)
        self._write_position(_Pos.AT, to, to, self._redo_end)
        return moved, records

    def _run_back_batch(self, batch: list[tuple[int, int, int]]) -> int:
        rec = self._rec
        buf = bytearray()
        for fd, at, seq in batch:
            rec.read(fd, at, _NO_LIMIT, verify=False, header_only=True)
            off, length = rec.offset, rec.length
            if _has_data(self._disk, off, length):
                view = memoryview(self._rbuf)[:length] if length <= len(self._rbuf) else self._grow(length)
                _pread_full(self._disk, view, off)
                zero = _is_zero(self._rbuf, length)
            else:
                view, zero = memoryview(b""), True
            payload = b"" if zero else view
            _REC.pack_into(
                self._hdr,
                0,
                _REC_MAGIC,
                _Kind.ZERO if zero else _Kind.DATA,
                0,
                0,
                seq,
                0.0,
                off,
                length,
                len(payload),
                0,
            )
            struct.pack_into("<Q", self._hdr, _CSUM_AT, _checksum(memoryview(self._hdr), payload))
            buf += self._hdr
            buf += payload
        _pwrite_all(self._redo_fd, memoryview(buf), self._redo_end)
        os.fdatasync(self._redo_fd)
        self._redo_end += len(buf)
        return sum(self._restore(fd, at, self._disk) for fd, at, _s in batch)

    def _move_forward(self, frm: int, to: int) -> tuple[int, int]:
        moved = records = 0
        first = self._redo_end
        for at in self._redo_stream(frm, to):
            moved += self._restore(self._redo_fd, at, self._disk)
            first = min(first, at)
            records += 1
        os.fdatasync(self._disk)
        # The position names the shortened redo log before the log is cut, so a crash in between
        # only leaves bytes that the next open cuts off.
        final = _Pos.LATEST if to >= self._committed else _Pos.AT
        self._write_position(final, to, to, first)
        self._truncate_redo(first)
        return moved, records

    def _valid_redo_after(self, mark: int) -> int:
        """Count whole redo records after `mark` and cut a torn tail."""
        count = 0
        at = mark
        size = os.fstat(self._redo_fd).st_size
        while self._rec.read(self._redo_fd, at, size, verify=True):
            at += self._rec.end_delta
            count += 1
        self._truncate_redo(at)
        return count

    def _truncate_redo(self, end: int) -> None:
        if os.fstat(self._redo_fd).st_size != end:
            os.ftruncate(self._redo_fd, end)
            os.fsync(self._redo_fd)
        self._redo_end = end

    def _open_redo(self) -> None:
        path = self.journal_dir / "redo.jnl"
        self._redo_fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        if os.fstat(self._redo_fd).st_size < _FILE_HDR.size:
            os.ftruncate(self._redo_fd, 0)
            os.pwrite(self._redo_fd, _FILE_HDR.pack(_REDO_MAGIC, 0, -1), 0)
            os.fsync(self._redo_fd)
            _fsync_dir(self.journal_dir)
        self._redo_end = os.fstat(self._redo_fd).st_size

    def _write_position(self, state: _Pos, frm: int, to: int, mark: int) -> None:
        path = self.journal_dir / "position"
        tmp = self.journal_dir / "position.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, _POS.pack(_POS_MAGIC, state, frm, to, mark))
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        _fsync_dir(self.journal_dir)
        self._position = state if state in (_Pos.LATEST, _Pos.AT) else _Pos.AT
        self._pos_seq = to if state in (_Pos.LATEST, _Pos.AT) else frm

    def _resume_position(self) -> None:
        """Finish a move interrupted by a crash, or restore the rolled-back position."""
        path = self.journal_dir / "position"
        if not path.exists():
            return
        raw = path.read_bytes()
        if len(raw) != _POS.size or raw[:8] != _POS_MAGIC:
            raise self._corrupt(path, "bad position file")
        _m, state, frm, to, mark = _POS.unpack(raw)
        if state == _Pos.MOVING_BACK:
            self._position, self._pos_seq = _Pos.AT, frm
            try:
                self._move_back(frm, to, mark)
            finally:
                self._close_read_fds()
        elif state == _Pos.MOVING_FORWARD:
            self._position, self._pos_seq = _Pos.AT, frm
            self._truncate_redo(max(mark, _FILE_HDR.size))
            self._move_forward(frm, to)
        elif state == _Pos.AT:
            self._position, self._pos_seq = _Pos.AT, to
            self._truncate_redo(max(mark, _FILE_HDR.size))
        else:
            self._position = _Pos.LATEST
            self._truncate_redo(max(mark, _FILE_HDR.size))

    # ---- internals: copies ------------------------------------------------------------------

    def _clone(self, out: int) -> tuple[CopyMethod, int]:
        """Copy the disk into `out`: a reflink when the file system shares extents, else a sparse copy."""
        try:
            fcntl.ioctl(out, _FICLONE, self._disk)
            return CopyMethod.REFLINK, 0
        except OSError:
            pass
        size = os.fstat(self._disk).st_size
        os.ftruncate(out, size)
        copied = 0
        for start, n in _data_extents(self._disk, 0, size):
            pos = start
            while pos < start + n:
                done = os.copy_file_range(self._disk, out, start + n - pos, pos, pos)
                if done == 0:
                    break
                pos += done
            copied += n
        return CopyMethod.COPY_FILE_RANGE, copied


def journaled_applier_factory(
    journal_root: Path,
    retention_seconds: float,
    crash_points: CrashPointPolicy | None = None,
    quota_bytes: int | None = None,
) -> ApplierFactory:
    """An `ApplierFactory` for the master target: one journal per pair under the retention volume."""

    def make(pair_id: str, path: Path, size: int, state_dir: Path) -> DiskApplier:
        # The pair's state lives in its journal on the retention volume, not in state_dir.
        return JournaledDisk(
            path,
            journal_root / pair_id,
            retention_seconds,
            name=pair_id,
            size=size,
            quota_bytes=quota_bytes,
            crash_points=crash_points,
        )

    return make
