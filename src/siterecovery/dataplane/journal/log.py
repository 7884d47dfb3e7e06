"""The journal as an append-only log: appending and flushing records, segments, recovery on open.

`_JournalLog` holds the state of a `JournaledDisk` and the write-ahead rule: undo records are
buffered, written to the active segment and fsynced before the disk bytes they protect change;
`sync()` ends with a fsynced commit record. On open, segments are scanned for points and commits
and whatever follows the last commit is rolled back onto the disk and cut off. Segments rotate
by size and time and are pruned whole once older than the retention window.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable
from pathlib import Path

from siterecovery.dataplane.direct_write import DirectWriter
from siterecovery.dataplane.fileio import (
    fsync_dir,
    punch_or_zero,
    pwrite_all,
)
from siterecovery.dataplane.journal.format import (
    _CODE_POINT,
    _CSUM_AT,
    _FILE_HDR,
    _FULL_ERRNOS,
    _IO,
    _NO_LIMIT,
    _POINT_CODE,
    _REC,
    _REC_MAGIC,
    _SEG_MAGIC,
    _checksum,
    _commit_follows,
    _Kind,
    _Pos,
    _Record,
    _Segment,
    _VolumeFull,
)
from siterecovery.dataplane.journal.ranges import _Pending
from siterecovery.dataplane.points import CrashPointPolicy, PointKind, RecoveryPoint, disk_point
from siterecovery.errors import Problem, SiteRecoveryError, Status


class _JournalLog:
    """Appending, committing, opening and pruning; the disk moves build on it (`moves.py`)."""

    # The state; `JournaledDisk.__init__` sets it (see there for what each holds).
    target: Path
    journal_dir: Path
    retention_seconds: float
    _name: str
    quota_bytes: int | None
    crash_points: CrashPointPolicy
    _clock: Callable[[], float]
    _segment_bytes: int
    _segment_seconds: float
    _pending_limit: int
    _drop_batch: int
    paused: Problem | None
    _lock_fd: int
    _disk: int
    _direct: DirectWriter
    _rec: _Record
    _rbuf: bytearray
    _hdr: bytearray
    _jbuf: bytearray
    _pending: _Pending
    _seg_start_time: float
    _segments: list[_Segment]
    _read_fds: dict[int, int]
    _seg_fd: int
    _commit_end: int
    _points: list[RecoveryPoint]
    _seq: int
    _committed: int
    _commit_time: float
    _last_point_time: float
    _last_point_seq: int
    _redo_fd: int
    _redo_end: int
    _position: _Pos
    _pos_seq: int
    damaged_below: int

    def sync(self) -> None:
        """Make everything applied durable: journal, then disk, then a fsynced commit record."""
        if self._seq == self._committed and not self._jbuf and not self._pending.nbytes:
            self._prune()
            return
        now = self._clock()
        try:
            self._flush_pending()
            self._disk_io(os.fdatasync)
            self._drop_streamed()
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

    @property
    def journal_bytes(self) -> int:
        """Space the journal uses on the retention volume (segments, redo log, unwritten buffer)."""
        return sum(s.size for s in self._segments) + self._redo_end + len(self._jbuf)

    @property
    def oldest_restorable_seq(self) -> int:
        return self._segments[0].base_seq

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
                pwrite_all(self._seg_fd, memoryview(self._jbuf), seg.size)
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
        self._disk_io(self._pending.drain, self._direct)

    def _drop_streamed(self) -> None:
        """Drop the durable pages of streamed runs from the page cache, once they add up to
        `_drop_batch`: a replica's bytes are rarely read back soon (digests answer resyncs,
        `target_digests.py`), and a master target holding many disks should not fill its memory
        with them. On a VM whose free memory goes back to the host, growing the page cache was also
        most of the master target's CPU in a full sync (each fresh page a host fault); recycled
        pages are cheap (issue 16). In batches, because a drop can wait for every CPU to drain its
        page lists, which on a loaded box stalled the applying thread once per sync."""
        streamed = self._pending.streamed
        if sum(n for _, n in streamed) < self._drop_batch:
            return
        start, end = streamed[0][0], streamed[0][0]
        for offset, length in [*sorted(streamed), (-1, 0)]:
            if offset != end:  # not adjacent: drop the range so far (the sentinel ends the last)
                os.posix_fadvise(self._disk, start, end - start, os.POSIX_FADV_DONTNEED)
                start = offset
            end = offset + length
        streamed.clear()

    def _disk_io(self, fn: Callable[..., None], *args: object) -> None:
        try:
            fn(self._disk, *args)
        except OSError as exc:
            if exc.errno in _FULL_ERRNOS:
                raise _VolumeFull("target", exc) from exc
            raise

    def _grow(self, n: int) -> memoryview:
        self._rbuf = bytearray(n)
        return memoryview(self._rbuf)

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
            pwrite_all(out_fd, rec.payload, rec.offset)
        return rec.length

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
            fsync_dir(self.journal_dir)
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
