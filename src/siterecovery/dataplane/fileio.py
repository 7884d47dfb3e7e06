"""File helpers the data plane shares: whole reads and writes, zero checks, holes, durability.

Every module that touches a disk image, a journal or a log reads and writes through these, so a
short read, a hole or a file system without hole punching is handled one way everywhere.
`write_durably` and `fsync_dir` are the crash-safe replacement of small state files: the new
content goes to a temporary file that is fsynced, renamed over the old one, and the directory is
fsynced so the rename itself survives a power loss; a reader finds the old content or the new one.
"""

from __future__ import annotations

import ctypes
import errno
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02


def _load_fallocate() -> Callable[[int, int, int, int], int] | None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.fallocate
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    fn.restype = ctypes.c_int
    return fn


# libc's fallocate(2), or None where it cannot be loaded (callers then write zeroes).
fallocate = _load_fallocate()

# Zero detection compares against zero-filled bytearrays: `bytearray == memoryview` is a memcmp,
# while `memoryview == memoryview` compares element by element (70x slower). One buffer per power
# of two up to 1 MiB covers any length with at most log2(n) comparisons and 2 MiB of memory.
ZERO_CHUNK = 1 << 20
_ZEROS = [bytearray(1 << i) for i in range(21)]
ZERO_VIEW = memoryview(bytes(ZERO_CHUNK))


def is_zero(data: memoryview) -> bool:
    """True if every byte of `data` is zero; random data fails on the first bytes."""
    n = len(data)
    if 0 < n <= ZERO_CHUNK and not n & (n - 1):
        return _ZEROS[n.bit_length() - 1] == data  # a power of two (most writes): one memcmp
    pos = 0
    big = _ZEROS[20]
    while n - pos >= ZERO_CHUNK:
        if big != data[pos : pos + ZERO_CHUNK]:
            return False
        pos += ZERO_CHUNK
    rest = n - pos
    bit = 19
    while rest:
        size = 1 << bit
        if rest >= size:
            if _ZEROS[bit] != data[pos : pos + size]:
                return False
            pos += size
            rest -= size
        bit -= 1
    return True


def punch_or_zero(fd: int, offset: int, length: int) -> None:
    """Make [offset, offset+length) read as zeroes, keeping the file sparse where possible."""
    if length <= 0:
        return
    if fallocate is not None:
        rc = fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
        if rc == 0:
            return
        err = ctypes.get_errno()
        if err not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            raise OSError(err, os.strerror(err))
    end = offset + length
    while offset < end:
        n = min(ZERO_CHUNK, end - offset)
        os.pwrite(fd, ZERO_VIEW[:n], offset)
        offset += n


def pread_full(fd: int, view: memoryview, offset: int) -> int:
    """Read up to len(view) bytes at offset; fewer only at end of file."""
    got = 0
    while got < len(view):
        n = os.preadv(fd, [view[got:]], offset + got)
        if n == 0:
            break
        got += n
    return got


def pread_zero_filled(fd: int, view: memoryview, offset: int) -> None:
    """Fill `view` from `offset`; bytes past the end of the file read as zeroes."""
    got = pread_full(fd, view, offset)
    while got < len(view):
        n = min(ZERO_CHUNK, len(view) - got)
        view[got : got + n] = ZERO_VIEW[:n]
        got += n


def pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    """Write all of `data` at `offset` (a short pwrite is continued)."""
    done = 0
    while done < len(data):
        done += os.pwrite(fd, data[done:], offset + done)


# Largest single write `pwrite_pieces` hands the kernel. The page cache sizes a folio after the write
# that creates it: a 1 MiB pwrite leaves 1 MiB folios, and every later 4 KiB write into one walks all
# its blocks (ext4 with large folios, kernel 6.18 here): 12.6 us of CPU per 4 KiB write into a range
# cached by 1 MiB writes, 3.9 us after 64 KiB writes, 2.5 us after 16 KiB ones, while writing the
# large data in 64 KiB pieces costs 0.21 CPU-s per GiB against 0.18 in 1 MiB ones.
WRITE_PIECE = 64 << 10


def pwrite_pieces(fd: int, data: memoryview, offset: int) -> None:
    """`pwrite_all` in writes of at most `WRITE_PIECE` bytes: the image of an export that takes large
    and small writes to the same places keeps no large folios in the cache for the small ones."""
    n = len(data)
    done = os.pwrite(fd, data if n <= WRITE_PIECE else data[:WRITE_PIECE], offset)
    while done < n:
        done += os.pwrite(fd, data[done : done + WRITE_PIECE], offset + done)


def pwritev_all(fd: int, bufs: Sequence[bytes | bytearray | memoryview], offset: int) -> None:
    """Write the buffers back to back from `offset` (one pwritev; a short one is continued)."""
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


@dataclass(frozen=True)
class Extent:
    offset: int
    length: int
    data: bool


def extents(fd: int, size: int, start: int = 0) -> Iterator[Extent]:
    """Data and hole extents covering [start, size), from SEEK_DATA/SEEK_HOLE where supported."""
    pos = start
    while pos < size:
        try:
            data = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # no data after pos: the rest is a hole
                yield Extent(pos, size - pos, False)
                return
            if exc.errno == errno.EINVAL:  # file system without SEEK_DATA: all data
                yield Extent(pos, size - pos, True)
                return
            raise
        data = min(data, size)
        if data > pos:
            yield Extent(pos, data - pos, False)
        if data >= size:
            return
        hole = min(os.lseek(fd, data, os.SEEK_HOLE), size)
        yield Extent(data, hole - data, True)
        pos = hole


def data_extents(fd: int, offset: int, length: int) -> Iterator[tuple[int, int]]:
    """Allocated (start, length) ranges inside [offset, offset+length); holes are skipped."""
    for ext in extents(fd, offset + length, offset):
        if ext.data:
            yield ext.offset, ext.length


def has_data(fd: int, offset: int, length: int) -> bool:
    """True if any of [offset, offset+length) is allocated (it may still read as zeroes)."""
    try:
        return os.lseek(fd, offset, os.SEEK_DATA) < offset + length
    except OSError as exc:
        if exc.errno == errno.ENXIO:  # no data from offset to the end of the file
            return False
        if exc.errno == errno.EINVAL:  # file system without SEEK_DATA: all data
            return True
        raise


def fsync_dir(directory: Path) -> None:
    """Make a rename, creation or removal in `directory` durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durably(path: Path, data: bytes | bytearray, *, mode: int = 0o600, tmp: Path | None = None) -> None:
    """Replace `path` with `data` atomically and durably (tmp + fsync + rename + fsync dir).

    The temporary file is `tmp`, by default `<name>.tmp` beside `path` (one writer at a time);
    `mode` applies to a new file.
    """
    tmp = tmp or path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    fsync_dir(path.parent)
