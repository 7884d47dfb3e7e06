"""Block digests and data extents of a disk image, shared by both ends of a resync.

A disk is cut into coarse blocks (1 MiB) made of fine blocks (4 KiB). A fine block's digest is the
xxh3-128 of its bytes; a coarse block's digest is the xxh3-128 of its fine digests, so one pass over
the data yields both levels and the two ends can compare coarse digests first and fine digests only
inside the coarse blocks that differ. Holes (found with SEEK_DATA/SEEK_HOLE) are never read: their
digests are precomputed constants, as are those of blocks that read as zeroes. Hashing runs in
several threads, each with one reused buffer; xxhash and preadv release the GIL.
"""

from __future__ import annotations

import errno
import functools
import os
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import xxhash

COARSE = 1 << 20
FINE = 4096
DIGEST_SIZE = 16


@functools.lru_cache(maxsize=8)
def zero_digest(length: int) -> bytes:
    """Digest of `length` zero bytes (precomputed: the zero check costs one comparison)."""
    return xxhash.xxh3_128_digest(bytes(length))


@functools.lru_cache(maxsize=8)
def zero_fine_digests(coarse: int = COARSE, fine: int = FINE) -> bytes:
    return zero_digest(fine) * (coarse // fine)


@functools.lru_cache(maxsize=8)
def zero_coarse_digest(coarse: int = COARSE, fine: int = FINE) -> bytes:
    return xxhash.xxh3_128_digest(zero_fine_digests(coarse, fine))


@dataclass(frozen=True)
class Extent:
    offset: int
    length: int
    data: bool


def extents(fd: int, size: int) -> Iterator[Extent]:
    """Data and hole extents covering [0, size), from SEEK_DATA/SEEK_HOLE where supported."""
    pos = 0
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


def coarse_data_map(fd: int, size: int, coarse: int = COARSE) -> bytearray:
    """One byte per coarse block: 1 if any of it is allocated data, 0 if it is all hole."""
    nblocks = (size + coarse - 1) // coarse
    out = bytearray(nblocks)
    for ext in extents(fd, size):
        if ext.data:
            for i in range(ext.offset // coarse, (ext.offset + ext.length - 1) // coarse + 1):
                out[i] = 1
    return out


def pread_full(fd: int, view: memoryview, offset: int) -> int:
    """Read up to len(view) bytes at offset; fewer only at end of file."""
    got = 0
    while got < len(view):
        n = os.preadv(fd, [view[got:]], offset + got)
        if n == 0:
            break
        got += n
    return got


class BlockHasher:
    """Coarse and fine digests of one image, computed once and kept for the comparison."""

    def __init__(
        self, path: Path, size: int, coarse: int = COARSE, fine: int = FINE, workers: int = 2
    ) -> None:
        self.path = path
        self.size = size
        self.coarse = coarse
        self.fine = fine
        self.workers = workers
        self.nblocks = (size + coarse - 1) // coarse
        self._fine: dict[int, bytes] = {}
        self._coarse: bytes | None = None
        self._lock = threading.Lock()
        self.bytes_read = 0

    def coarse_digests(self) -> bytes:
        """All coarse digests, concatenated (16 bytes per block); computed once."""
        if self._coarse is not None:
            return self._coarse
        fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            data_map = coarse_data_map(fd, self.size, self.coarse)
        finally:
            os.close(fd)
        out = bytearray(zero_coarse_digest(self.coarse, self.fine) * self.nblocks)
        todo = [i for i in range(self.nblocks) if data_map[i]]
        step = max(1, (len(todo) + self.workers * 8 - 1) // (self.workers * 8))
        parts = [todo[i : i + step] for i in range(0, len(todo), step)]
        with ThreadPoolExecutor(self.workers) as pool:
            for part_out in pool.map(self._hash_blocks, parts):
                for idx, coarse_digest in part_out:
                    out[idx * DIGEST_SIZE : (idx + 1) * DIGEST_SIZE] = coarse_digest
        self._coarse = bytes(out)
        return self._coarse

    def fine_digests(self, idx: int) -> bytes:
        """The fine digests of coarse block `idx` (from the first pass when it read the block)."""
        with self._lock:
            cached = self._fine.get(idx)
        if cached is not None:
            return cached
        self._hash_blocks([idx])
        with self._lock:
            return self._fine.get(idx, zero_fine_digests(self.coarse, self.fine))

    def _hash_blocks(self, indexes: list[int]) -> list[tuple[int, bytes]]:
        buf = bytearray(self.coarse)
        view = memoryview(buf)
        fine = self.fine
        zero_all = zero_coarse_digest(self.coarse, self.fine)
        out: list[tuple[int, bytes]] = []
        digest = xxhash.xxh3_128_digest
        fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            for idx in indexes:
                n = pread_full(fd, view, idx * self.coarse)
                if n < self.coarse:
                    view[n:] = bytes(self.coarse - n)
                self.bytes_read += n
                if digest(view) == zero_digest(self.coarse):
                    out.append((idx, zero_all))
                    continue
                fines = b"".join([digest(view[o : o + fine]) for o in range(0, self.coarse, fine)])
                with self._lock:
                    self._fine[idx] = fines
                out.append((idx, digest(fines)))
        finally:
            os.close(fd)
        return out
