"""The before-image log: copy-before-write preservation of a disk image, so a snapshot can be reverted.

A disk image `<image>` being preserved has a sidecar `<image>.before-image`: a file header (magic,
chunk size, disk size) followed by records, each the old contents of one chunk (aligned to the chunk
size, clipped at the disk's end) saved the first time anything overwrites it. Whatever serves the
disk calls `BeforeImageLog.preserve` before each write or zero and the log is fdatasync'd before the
disk is touched (write-ahead; the NBD server saves the chunks of all requests queued on a connection
under one fdatasync, `preserve_all`), so after any crash every chunk that differs from the snapshot has a
durable record; a record that is short or fails its xxh3-64 checksum can only be the torn tail of a
write that never reached the disk, and is cut. `restore` (machine off) writes the saved chunks back,
with zero blocks punched so holes stay holes, and empties the log so it preserves again from there.
"""

from __future__ import annotations

import fcntl
import os
import struct
from collections.abc import Iterable
from pathlib import Path

import xxhash

from siterecovery.dataplane.fileio import fsync_dir, punch_or_zero
from siterecovery.dataplane.fileio import pread_full as _pread_full
from siterecovery.dataplane.fileio import pwrite_all as _pwrite_full
from siterecovery.errors import SiteRecoveryError, conflict, invalid

SUFFIX = ".before-image"
DEFAULT_CHUNK = 64 << 10

_MAGIC = b"SRBIMG01"
_RECORD_MAGIC = b"SRBR"
# magic, chunk size, reserved, disk size, xxh3-64 of the 24 bytes before it.
_HEADER = struct.Struct(">8sIIQQ")
# magic, flags, offset, length, xxh3-64 of the 24 bytes before it and of the payload.
_RECORD = struct.Struct(">4sIQQQ")
_SUMMED = 24
_U64 = struct.Struct(">Q")
_FLAG_ZERO = 1  # the chunk read as zeroes: no payload, restored as a hole
# Restore writes back in blocks of this size and punches the zero ones: a half-hole chunk stays so.
_BLOCK = 4096
_ZERO_BLOCK = bytearray(_BLOCK)
_REMEDIATION = {
    "before-image-in-use": "Power the machine off (stop its disk's export) before reverting its snapshot.",
    "before-image-invalid": "Discard the snapshot of this disk and take a new one.",
}


def log_path(image: Path) -> Path:
    return image.with_name(image.name + SUFFIX)


def create(image: Path, chunk: int = DEFAULT_CHUNK) -> Path:
    """Start preserving: an empty log (header only) made durable, replacing any existing log."""
    if chunk <= 0 or chunk % _BLOCK or chunk >= 1 << 32:
        raise invalid(
            "chunk",
            f"Before-image chunk size {chunk} for {image} is invalid.",
            f"Use a positive multiple of {_BLOCK} below 4 GiB.",
        )
    head = _HEADER.pack(_MAGIC, chunk, 0, os.stat(image).st_size, 0)[:_SUMMED]
    path = log_path(image)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        _pwrite_full(fd, memoryview(head + _U64.pack(xxhash.xxh3_64_intdigest(head))), 0)
        os.fsync(fd)
    finally:
        os.close(fd)
    # Renamed into place so a crash leaves the old log or a whole new header, never half of one.
    os.replace(tmp, path)
    fsync_dir(path.parent)
    return path


def restore(image: Path) -> int:
    """Revert the image to the snapshot, empty the log (it preserves again); bytes restored."""
    if not log_path(image).exists():
        return 0
    disk = os.open(image, os.O_RDWR | os.O_CLOEXEC)
    log = None
    try:
        log = BeforeImageLog._open(image, disk, write_back=True)
        if log is None:
            return 0
        os.fdatasync(disk)
        # Only once the image is durable: a crash before this leaves the log to restore again.
        os.ftruncate(log._fd, _HEADER.size)
        os.fsync(log._fd)
        return log.saved_bytes
    finally:
        if log is not None:
            log.close()
        os.close(disk)


def discard(image: Path) -> None:
    """Stop preserving: unlink the log (a running export stops at its next new chunk)."""
    log_path(image).unlink(missing_ok=True)


def _refused(code: str, path: Path, what: str) -> SiteRecoveryError:
    return conflict(code, f"Before-image log {path} {what}.", _REMEDIATION[code])


def _digest(record: memoryview, size: int) -> int:
    summed = xxhash.xxh3_64(record[:_SUMMED])
    summed.update(record[_RECORD.size : _RECORD.size + size])
    return summed.intdigest()


def _punch(disk: int, offset: int, length: int, disk_size: int) -> None:
    if offset + length == disk_size and length % _BLOCK:
        # A disk that ends mid-block: only punching to the block's end frees that last block...
        punch_or_zero(disk, offset, length + _BLOCK - length % _BLOCK)
        if os.fstat(disk).st_size != disk_size:  # ...and where nothing punches, zeroes went past it.
            os.ftruncate(disk, disk_size)
    else:
        punch_or_zero(disk, offset, length)


class BeforeImageLog:
    """An open log: the saved-chunk bitmap (one bit per chunk) and the append position, one writer."""

    def __init__(self, fd: int, disk_fd: int, chunk: int, disk_size: int) -> None:
        self._fd, self._disk_fd = fd, disk_fd
        self._chunk, self._size = chunk, disk_size
        self._bits = bytearray((disk_size + chunk - 1) // chunk // 8 + 1)
        # One record (header and payload) at a time, read from the disk or the log in place.
        self._buf = bytearray(_RECORD.size + chunk)
        self._zeros = bytearray(chunk)
        self._end = _HEADER.size
        self._saved = 0

    @classmethod
    def open_for(cls, image: Path, disk_fd: int) -> BeforeImageLog | None:
        """The log of this image if one exists (None otherwise): scans it, cuts a torn tail."""
        return cls._open(image, disk_fd, write_back=False)

    @classmethod
    def _open(cls, image: Path, disk_fd: int, *, write_back: bool) -> BeforeImageLog | None:
        path = log_path(image)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        try:
            try:
                # Held while the log is open: a revert must never rewrite a disk that is served.
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise _refused("before-image-in-use", path, "is held by an export or a revert") from None
            head = os.pread(fd, _HEADER.size, 0).ljust(_HEADER.size, b"\0")
            magic, chunk, _, disk_size, digest = _HEADER.unpack(head)
            if magic != _MAGIC or xxhash.xxh3_64_intdigest(head[:_SUMMED]) != digest:
                raise _refused("before-image-invalid", path, "has no valid header")
            if (actual := os.fstat(disk_fd).st_size) != disk_size:
                raise _refused(
                    "before-image-invalid", path, f"covers {disk_size} bytes, the disk has {actual}"
                )
            log = cls(fd, disk_fd, chunk, disk_size)
            log._scan(write_back)
        except BaseException:
            os.close(fd)
            raise
        return log

    def _scan(self, write_back: bool) -> None:
        """Rebuild the bitmap from the valid records, writing each back onto the disk if asked."""
        view, pos, end = memoryview(self._buf), _HEADER.size, os.fstat(self._fd).st_size
        while pos + _RECORD.size <= end:
            got = _pread_full(self._fd, view, pos)
            magic, flags, offset, length, digest = _RECORD.unpack_from(self._buf)
            size = 0 if flags & _FLAG_ZERO else length
            if (
                magic != _RECORD_MAGIC
                or offset % self._chunk
                or offset >= self._size
                or length != min(self._chunk, self._size - offset)
                or got < _RECORD.size + size
                or _digest(view, size) != digest
            ):
                break
            index = offset // self._chunk
            # Only the first record of a chunk holds its contents at the snapshot.
            if not self._bits[index >> 3] & (1 << (index & 7)):
                self._bits[index >> 3] |= 1 << (index & 7)
                self._saved += length
                if write_back:
                    self._write_back(offset, view[_RECORD.size : _RECORD.size + length], bool(size))
            pos += _RECORD.size + size
        if pos != end:
            # By write-ahead, the torn record's overwrite never happened: nothing is lost.
            os.ftruncate(self._fd, pos)
            os.fdatasync(self._fd)
        self._end = pos

    def _write_back(self, offset: int, payload: memoryview, has_payload: bool) -> None:
        if not has_payload:
            _punch(self._disk_fd, offset, len(payload), self._size)
            return
        for block in range(0, len(payload), _BLOCK):
            part = payload[block : block + _BLOCK]
            if (_ZERO_BLOCK if len(part) == _BLOCK else bytearray(len(part))) == part:
                _punch(self._disk_fd, offset + block, len(part), self._size)
            else:
                _pwrite_full(self._disk_fd, part, offset + block)

    @property
    def active(self) -> bool:
        return self._fd >= 0

    @property
    def saved_bytes(self) -> int:
        return self._saved

    def covers(self, offset: int, length: int) -> bool:
        """Whether every chunk of [offset, offset+length) is saved already (or nothing is to be)."""
        if self._fd < 0 or length <= 0:
            return True
        bits, chunk = self._bits, self._chunk
        last = (min(offset + length, self._size) - 1) // chunk
        return all(bits[i >> 3] & (1 << (i & 7)) for i in range(offset // chunk, last + 1))

    def preserve(self, offset: int, length: int) -> None:
        """Save, durably, every chunk of [offset, offset+length) not saved yet; call before writing it."""
        self.preserve_all([(offset, length)])

    def preserve_all(self, ranges: Iterable[tuple[int, int]]) -> None:
        """Save every chunk of `ranges` not saved yet, under one fdatasync; call before writing any.

        The NBD server passes the ranges of all requests already queued on a connection: saving a
        chunk before its first write is needed is harmless (it still holds the snapshot's bytes),
        and one fdatasync for the lot instead of one per request is what makes a snapshot's first
        pass over a disk affordable.
        """
        if self._fd < 0:
            return
        bits, chunk, size = self._bits, self._chunk, self._size
        wanted: set[int] = set()
        for offset, length in ranges:
            if length > 0:
                wanted.update(range(offset // chunk, (min(offset + length, size) - 1) // chunk + 1))
        new = sorted(i for i in wanted if not bits[i >> 3] & (1 << (i & 7)))
        if not new:
            return
        if os.fstat(self._fd).st_nlink == 0:
            # The snapshot was removed while the machine runs: nothing to preserve any more.
            self.close()
            return
        start = self._end
        try:
            for index in new:
                self._append(index * chunk)
            os.fdatasync(self._fd)
        except OSError:
            # Not durable, so not saved: the next write of these chunks saves them again.
            self._end = start
            raise
        for index in new:
            bits[index >> 3] |= 1 << (index & 7)
            self._saved += min(chunk, size - index * chunk)

    def _append(self, offset: int) -> None:
        """One record: the chunk at `offset` read from the disk straight into the record buffer."""
        n = min(self._chunk, self._size - offset)
        view = memoryview(self._buf)
        payload = view[_RECORD.size : _RECORD.size + n]
        got = _pread_full(self._disk_fd, payload, offset)
        payload[got:] = self._zeros[: n - got]
        zero = (self._zeros if n == self._chunk else self._zeros[:n]) == payload
        size = 0 if zero else n
        _RECORD.pack_into(self._buf, 0, _RECORD_MAGIC, _FLAG_ZERO if zero else 0, offset, n, 0)
        _U64.pack_into(self._buf, _SUMMED, _digest(view, size))
        _pwrite_full(self._fd, view[: _RECORD.size + size], self._end)
        self._end += _RECORD.size + size

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
