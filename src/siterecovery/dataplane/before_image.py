"""The before-image log: copy-before-write preservation of a disk image, so a snapshot can be reverted.

A disk image `<image>` being preserved has a sidecar `<image>.before-image`: a file header (magic,
chunk size, disk size) followed by records, each the old contents of one chunk (aligned to the chunk
size, clipped at the disk's end) saved the first time anything overwrites it. Whatever serves the
disk calls `BeforeImageLog.preserve` before each write or zero and the log is fdatasync'd before the
disk is touched (write-ahead), so after any crash every chunk that differs from the snapshot has a
durable record; a record that is short or fails its xxh3-64 checksum can only be the torn tail of a
write that never reached the disk, and is cut. `restore` (machine off) writes the saved chunks back,
with zero runs punched so holes stay holes, and empties the log so it preserves again from there.
"""

from __future__ import annotations

import fcntl
import os
import struct
from pathlib import Path

import xxhash

from siterecovery.dataplane.apply import punch_or_zero
from siterecovery.errors import SiteRecoveryError, conflict, invalid

SUFFIX = ".before-image"
DEFAULT_CHUNK = 64 << 10

_MAGIC = b"SRBIMG01"
_RECORD_MAGIC = b"SRBR"
# magic, chunk size, reserved, disk size, xxh3-64 of the 24 bytes before it.
_HEADER = struct.Struct(">8sIIQQ")
# magic, flags, offset, length, xxh3-64 of the 24 bytes before it and the payload.
_RECORD = struct.Struct(">4sIQQQ")
_SUMMED = 24
_U64 = struct.Struct(">Q")
_FLAG_ZERO = 1  # the chunk read as zeroes: no payload, restored as a hole
# Restore writes back in blocks of this size, punching the zero ones: a chunk that was half hole
# comes back half hole.
_BLOCK = 4096
_ZERO_BLOCK = bytearray(_BLOCK)


def log_path(image: Path) -> Path:
    return image.with_name(image.name + SUFFIX)


def _header(chunk: int, disk_size: int) -> bytes:
    head = _HEADER.pack(_MAGIC, chunk, 0, disk_size, 0)[:_SUMMED]
    return head + xxhash.xxh3_64_intdigest(head).to_bytes(8, "big")


def _pread_full(fd: int, view: memoryview, offset: int) -> int:
    got = 0
    while got < len(view):
        n = os.preadv(fd, [view[got:]], offset + got)
        if n == 0:
            break
        got += n
    return got


def _pwrite_full(fd: int, view: memoryview, offset: int) -> None:
    done = 0
    while done < len(view):
        done += os.pwrite(fd, view[done:], offset + done)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def create(image: Path, chunk: int = DEFAULT_CHUNK) -> Path:
    """Start preserving: an empty log (header only) made durable, replacing any existing log."""
    if chunk <= 0 or chunk % _BLOCK or chunk >= 1 << 32:
        raise invalid(
            "chunk",
            f"Before-image chunk size {chunk} for {image} is invalid.",
            f"Use a positive multiple of {_BLOCK} below 4 GiB.",
        )
    path = log_path(image)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        _pwrite_full(fd, memoryview(_header(chunk, os.stat(image).st_size)), 0)
        os.fsync(fd)
    finally:
        os.close(fd)
    # Renamed into place so a crash leaves either the old log or a whole new header, never half.
    os.replace(tmp, path)
    _fsync_dir(path)
    return path


def restore(image: Path) -> int:
    """Revert the image to the snapshot, empty the log (it preserves again); bytes restored."""
    if not log_path(image).exists():
        return 0
    disk = os.open(image, os.O_RDWR | os.O_CLOEXEC)
    try:
        log = BeforeImageLog._open(image, disk, write_back=True)
        if log is None:
            return 0
        try:
            os.fdatasync(disk)
            # Only once the image is durable: a crash before this leaves the log to restore again.
            os.ftruncate(log._fd, _HEADER.size)
            os.fsync(log._fd)
            return log.saved_bytes
        finally:
            log.close()
    finally:
        os.close(disk)


def discard(image: Path) -> None:
    """Stop preserving: unlink the log (a running export stops at its next new chunk)."""
    log_path(image).unlink(missing_ok=True)


def _refused(code: str, path: Path, what: str, remediation: str) -> SiteRecoveryError:
    return conflict(code, f"Before-image log {path} {what}.", remediation)


def _punch(disk: int, offset: int, length: int, disk_size: int) -> None:
    if offset + length == disk_size and length % _BLOCK:
        # A disk that ends mid-block: only punching to the block's end frees the last block.
        punch_or_zero(disk, offset, length + _BLOCK - length % _BLOCK)
        if os.fstat(disk).st_size != disk_size:  # no hole punching here: zeroes were written past the end
            os.ftruncate(disk, disk_size)
    else:
        punch_or_zero(disk, offset, length)


def _write_back(disk: int, offset: int, payload: memoryview, disk_size: int) -> None:
    for block in range(0, len(payload), _BLOCK):
        part = payload[block : block + _BLOCK]
        if (_ZERO_BLOCK if len(part) == _BLOCK else bytearray(len(part))) == part:
            _punch(disk, offset + block, len(part), disk_size)
        else:
            _pwrite_full(disk, part, offset + block)


class BeforeImageLog:
    """An open log: the saved-chunk bitmap (one bit per chunk) and the append position, one writer."""

    def __init__(self, fd: int, disk_fd: int, chunk: int, disk_size: int) -> None:
        self._fd, self._disk_fd = fd, disk_fd
        self._chunk, self._size = chunk, disk_size
        self._bits = bytearray((disk_size + chunk - 1) // chunk // 8 + 1)
        # One record (header and payload) at a time: read from the disk or the log in place.
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
                raise _refused(
                    "before-image-in-use",
                    path,
                    "is held by another export or revert of the disk",
                    "Power the machine off (stop its export) before reverting its snapshot.",
                ) from None
            head = os.pread(fd, _HEADER.size, 0)
            magic, chunk, _, disk_size, digest = _HEADER.unpack(head.ljust(_HEADER.size, b"\0"))
            if magic != _MAGIC or xxhash.xxh3_64_intdigest(head[:_SUMMED]) != digest:
                raise _refused(
                    "before-image-invalid",
                    path,
                    "has no valid header",
                    "Discard the snapshot of this disk and take a new one.",
                )
            if os.fstat(disk_fd).st_size != disk_size:
                raise _refused(
                    "before-image-invalid",
                    path,
                    f"was taken of {disk_size} bytes but the disk has {os.fstat(disk_fd).st_size}",
                    "Resize the disk back, or discard the snapshot and take a new one.",
                )
            log = cls(fd, disk_fd, chunk, disk_size)
            log._scan(write_back)
        except BaseException:
            os.close(fd)
            raise
        return log

    def _scan(self, write_back: bool) -> None:
        """Rebuild the bitmap from the valid records (writing each back onto the disk if asked)."""
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
            ):
                break
            summed = xxhash.xxh3_64(view[:_SUMMED])
            summed.update(view[_RECORD.size : _RECORD.size + size])
            if summed.intdigest() != digest:
                break
            index = offset // self._chunk
            # Only the first record of a chunk holds its contents at the snapshot.
            if not self._bits[index >> 3] & (1 << (index & 7)):
                self._bits[index >> 3] |= 1 << (index & 7)
                self._saved += length
                if write_back and size:
                    _write_back(self._disk_fd, offset, view[_RECORD.size : _RECORD.size + size], self._size)
                elif write_back:
                    _punch(self._disk_fd, offset, length, self._size)
            pos += _RECORD.size + size
        if pos != end:
            # By write-ahead, the torn record's overwrite never happened: nothing is lost.
            os.ftruncate(self._fd, pos)
            os.fdatasync(self._fd)
        self._end = pos

    @property
    def active(self) -> bool:
        return self._fd >= 0

    @property
    def saved_bytes(self) -> int:
        return self._saved

    def preserve(self, offset: int, length: int) -> None:
        """Save, durably, every chunk of [offset, offset+length) not saved yet; call before writing it."""
        if self._fd < 0 or length <= 0:
            return
        bits, chunk, view = self._bits, self._chunk, memoryview(self._buf)
        start, added = self._end, list[int]()
        for index in range(offset // chunk, (min(offset + length, self._size) - 1) // chunk + 1):
            if bits[index >> 3] & (1 << (index & 7)):
                continue
            if not added and os.fstat(self._fd).st_nlink == 0:
                # The snapshot was removed while the machine runs: nothing to preserve any more.
                self.close()
                return
            at = index * chunk
            n = min(chunk, self._size - at)
            payload = view[_RECORD.size : _RECORD.size + n]
            got = _pread_full(self._disk_fd, payload, at)
            payload[got:] = self._zeros[: n - got]
            zero = (self._zeros if n == chunk else self._zeros[:n]) == payload
            size = 0 if zero else n
            _RECORD.pack_into(self._buf, 0, _RECORD_MAGIC, _FLAG_ZERO if zero else 0, at, n, 0)
            summed = xxhash.xxh3_64(view[:_SUMMED])
            summed.update(payload[:size])
            _U64.pack_into(self._buf, _SUMMED, summed.intdigest())
            try:
                _pwrite_full(self._fd, view[: _RECORD.size + size], self._end)
            except OSError:
                self._end = start
                raise
            self._end += _RECORD.size + size
            added.append(index)
        if added:
            try:
                os.fdatasync(self._fd)
            except OSError:
                # Not durable, so not saved: the next write of these chunks saves them again.
                self._end = start
                raise
            for index in added:
                bits[index >> 3] |= 1 << (index & 7)
                self._saved += min(chunk, self._size - index * chunk)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
