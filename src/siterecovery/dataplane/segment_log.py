"""An append-only, segmented log of encoded frames: the agent's spool and the process server's cache.

One log holds one pair's frames in increasing sequence order, in segment files named after their
first sequence number. A hop appends, `sync()`s (fsync) before acknowledging upstream, reads the
log back with cursors to send downstream, and frees whole segments once downstream acknowledged
their last frame. On open, a torn tail left by a crash (a partly written frame) is cut off; every
frame before it was either fsynced (and acknowledged) or never acknowledged, so nothing
acknowledged is lost.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path

from siterecovery.dataplane.fileio import fsync_dir as _fsync_dir
from siterecovery.dataplane.protocol import HEADER_SIZE, Header, ProtocolError, parse_header

_SUFFIX = ".seg"


@dataclass
class _Segment:
    first_seq: int
    last_seq: int
    size: int
    path: Path


class SegmentLog:
    """Frames of one pair, appended in sequence order. Thread-safe."""

    def __init__(self, directory: Path, segment_bytes: int = 64 << 20) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        self._segment_bytes = segment_bytes
        self._lock = threading.Lock()
        self.appended = threading.Condition(self._lock)
        self._segments: list[_Segment] = []
        self._fd: int | None = None
        self._unsynced: list[int] = []
        for path in sorted(directory.glob(f"*{_SUFFIX}")):
            seg = _scan(path)
            if seg is None:
                path.unlink()
            else:
                self._segments.append(seg)

    @property
    def last_seq(self) -> int:
        """Sequence of the newest frame held, or -1 when empty."""
        with self._lock:
            return self._segments[-1].last_seq if self._segments else -1

    @property
    def first_seq(self) -> int:
        with self._lock:
            return self._segments[0].first_seq if self._segments else -1

    @property
    def bytes_used(self) -> int:
        with self._lock:
            return sum(s.size for s in self._segments)

    def append(self, seq: int, header: bytes | bytearray | memoryview, payload: memoryview | bytes) -> None:
        """Append one frame (header + payload) whose sequence is `seq`."""
        with self._lock:
            if self._segments and seq <= self._segments[-1].last_seq:
                raise ValueError(f"sequence {seq} is not after {self._segments[-1].last_seq}")
            if self._fd is None or self._segments[-1].size >= self._segment_bytes:
                self._roll(seq)
            assert self._fd is not None
            n = os.writev(self._fd, [header, payload])
            want = len(header) + len(payload)
            if n != want:
                # writev on a regular file only comes up short on ENOSPC; make the tail whole.
                os.ftruncate(self._fd, self._segments[-1].size)
                raise OSError(f"short write to {self._segments[-1].path} ({n} of {want} bytes)")
            seg = self._segments[-1]
            seg.size += want
            seg.last_seq = seq
            self.appended.notify_all()

    def _roll(self, seq: int) -> None:
        if self._fd is not None:
            self._unsynced.append(self._fd)
        path = self.directory / f"{seq:020d}{_SUFFIX}"
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        self._segments.append(_Segment(seq, seq - 1, 0, path))
        _fsync_dir(self.directory)

    def sync(self) -> None:
        """Make every appended frame durable."""
        with self._lock:
            fds, self._unsynced = self._unsynced, []
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

    def free_through(self, seq: int) -> None:
        """Delete segments whose every frame has sequence <= `seq` (acknowledged downstream)."""
        with self._lock:
            keep: list[_Segment] = []
            for i, seg in enumerate(self._segments):
                if seg.size > 0 and seg.last_seq <= seq:
                    if i == len(self._segments) - 1 and self._fd is not None:
                        os.close(self._fd)
                        self._fd = None
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

    def cursor(self, after_seq: int) -> LogCursor:
        return LogCursor(self, after_seq)

    def _locate(self, seg_first: int, pos: int) -> tuple[_Segment | None, int]:
        """The segment to read next and the position in it (called with the lock held)."""
        for i, seg in enumerate(self._segments):
            if seg.first_seq == seg_first:
                if pos < seg.size:
                    return seg, pos
                if i + 1 < len(self._segments):
                    return self._segments[i + 1], 0
                return None, pos
            if seg.first_seq > seg_first:
                return seg, 0
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


def _pread_exact(fd: int, view: memoryview, offset: int) -> None:
    got = 0
    while got < len(view):
        n = os.preadv(fd, [view[got:]], offset + got)
        if n == 0:
            raise ProtocolError(f"log segment ended early at {offset + got}")
        got += n


def _scan(path: Path) -> _Segment | None:
    """Index a segment file, cutting off a torn tail; None if it holds no whole frame."""
    first = last = -1
    pos = 0
    hbuf = bytearray(HEADER_SIZE)
    size = path.stat().st_size
    with open(path, "rb") as f:
        while pos + HEADER_SIZE <= size:
            f.seek(pos)
            if f.readinto(hbuf) != HEADER_SIZE:
                break
            try:
                h = parse_header(hbuf)
            except ProtocolError:
                break
            if pos + HEADER_SIZE + h.payload_len > size:
                break
            first = h.seq if first < 0 else first
            last = h.seq
            pos += HEADER_SIZE + h.payload_len
    if pos < size:
        os.truncate(path, pos)
    if first < 0:
        return None
    return _Segment(first, last, pos, path)
