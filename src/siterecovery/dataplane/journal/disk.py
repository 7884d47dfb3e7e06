"""`JournaledDisk`: a target disk image plus its retention journal, behind the `DiskApplier` seam.

The master target applies a pair's stream through it (writes, zeroes, bookmarks, syncs) and the
points API lists and materialises its recovery points. The log it builds on is in `log.py`, the
moves between points in `moves.py`, the record format in `format.py`.
"""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Callable
from pathlib import Path

from siterecovery.dataplane.apply import ApplierFactory, DiskApplier
from siterecovery.dataplane.direct_write import DirectWriter
from siterecovery.dataplane.fileio import (
    data_extents,
    has_data,
    is_zero,
    pread_zero_filled,
    punch_or_zero,
)
from siterecovery.dataplane.journal.format import (
    _IO,
    _REC,
    _Kind,
    _Pos,
    _Record,
    _Segment,
    _VolumeFull,
)
from siterecovery.dataplane.journal.moves import _Mover
from siterecovery.dataplane.journal.ranges import _Pending
from siterecovery.dataplane.points import CrashPointPolicy, PointKind, RecoveryPoint, disk_point
from siterecovery.errors import Problem, SiteRecoveryError, Status

_PROBE_ABOVE = 64 << 10  # old bytes of a larger write: skip reading them if the range is a hole


class JournaledDisk(_Mover, DiskApplier):
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
        drop_batch: int = 256 << 20,
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
        self._drop_batch = drop_batch  # streamed bytes whose pages are dropped together (`_drop_streamed`)
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
        self._direct = DirectWriter(target)  # long aligned runs skip the page cache

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
        self._open_redo()
        self._resume_position()

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

    def apply_write(self, seq: int, offset: int, data: memoryview, *, owned: bool = False) -> None:
        """Journal the bytes a write replaces, then hold it until the undo records are durable;
        with `owned` the caller hands over `data`'s buffer (held as it is, not copied, and given
        back to `direct_write.POOL` once written if it came from there): the caller must not read
        `data` after this call."""
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
                self._pending.add(offset, data, owned=owned)
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
            extents = list(data_extents(self._disk, offset, length))
            self._check_quota(seq, _REC.size * (3 + len(extents)) + sum(n for _, n in extents))
            changed = False
            for start, n in extents:
                for chunk in range(start, start + n, _IO):
                    m = min(_IO, start + n - chunk)
                    view = memoryview(self._rbuf)[:m] if m <= len(self._rbuf) else self._grow(m)
                    pread_zero_filled(self._disk, view, chunk)
                    if not is_zero(view):
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
        self._direct.close()
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

    def points(self) -> list[RecoveryPoint]:
        """Committed points inside the retention window whose undo history is still kept."""
        horizon = self._clock() - self.retention_seconds
        floor = self.oldest_restorable_seq
        return [p for p in self._points if p.time >= horizon and floor <= p.cut[0].seq <= self._committed]

    def latest_point(self) -> RecoveryPoint:
        return disk_point(self._name, PointKind.LATEST, self._committed, self._commit_time)

    # ---- internals ----------------------------------------------------------------------------

    def _read_old(self, offset: int, n: int) -> memoryview | None:
        """The bytes a write at offset replaces, or None when they all read as zeroes."""
        in_pending = self._pending.overlaps(offset, offset + n)
        # A small read costs no more than asking the file system whether the range is allocated.
        if not in_pending and n > _PROBE_ABOVE and not has_data(self._disk, offset, n):
            return None
        view = memoryview(self._rbuf)[:n] if n <= len(self._rbuf) else self._grow(n)
        pread_zero_filled(self._disk, view, offset)
        if in_pending:
            self._pending.overlay(offset, view)
        return None if is_zero(view) else view

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
