"""Moving the disk between recovery points: rollback in place with redo, roll forward, copies.

Rolling back undoes every write newer than the point, newest first, in batches of disjoint
ranges; before each batch the bytes about to be overwritten are appended to the redo log and
fsynced, and a position file records the move, so a crash mid-way is finished on the next open.
Rolling forward re-applies the redo; a copy is a reflink or sparse copy plus the records.
"""

from __future__ import annotations

import fcntl
import os
import struct
from array import array
from collections.abc import Iterator
from pathlib import Path

from siterecovery.dataplane.fileio import (
    data_extents,
    fsync_dir,
    has_data,
    is_zero,
    pread_zero_filled,
    pwrite_all,
)
from siterecovery.dataplane.journal.format import (
    _CSUM_AT,
    _FICLONE,
    _FILE_HDR,
    _NO_LIMIT,
    _POS,
    _POS_MAGIC,
    _REC,
    _REC_MAGIC,
    _REDO_MAGIC,
    CopyMethod,
    MaterialiseResult,
    _checksum,
    _Kind,
    _Pos,
)
from siterecovery.dataplane.journal.log import _JournalLog
from siterecovery.dataplane.journal.ranges import _Ranges
from siterecovery.dataplane.points import PointKind, RecoveryPoint
from siterecovery.errors import Problem, SiteRecoveryError, Status, recovery_point_unusable


class _Mover(_JournalLog):
    """Materialising points on top of the log; `JournaledDisk` adds the `DiskApplier` seam."""

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
            if has_data(self._disk, off, length):
                view = memoryview(self._rbuf)[:length] if length <= len(self._rbuf) else self._grow(length)
                pread_zero_filled(self._disk, view, off)
                zero = is_zero(view)
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
        pwrite_all(self._redo_fd, memoryview(buf), self._redo_end)
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
            fsync_dir(self.journal_dir)
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
        fsync_dir(self.journal_dir)
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
        for start, n in data_extents(self._disk, 0, size):
            pos = start
            while pos < start + n:
                done = os.copy_file_range(self._disk, out, start + n - pos, pos, pos)
                if done == 0:
                    break
                pos += done
            copied += n
        return CopyMethod.COPY_FILE_RANGE, copied
