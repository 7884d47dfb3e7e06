"""Block digests and data extents of a disk image, shared by both ends of a resync.

A disk is cut into coarse blocks (1 MiB) made of fine blocks (4 KiB). A fine block's digest is the
xxh3-128 of its bytes; a coarse block's digest is the xxh3-128 of its fine digests, so one pass over
the data yields both levels and the two ends can compare coarse digests first and fine digests only
inside the coarse blocks that differ. Holes (found with SEEK_DATA/SEEK_HOLE) are never read: their
digests are precomputed constants, as are those of blocks that read as zeroes. Hashing runs in
several threads, each with one reused buffer; xxhash and preadv release the GIL. A `BlockStream`
hashes in disk order in the background, a bounded distance ahead of its consumer, so a delta resync
compares and sends one region while both ends are still reading the next.
"""

from __future__ import annotations

import base64
import functools
import itertools
import os
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import xxhash

from siterecovery.dataplane.fileio import extents, pread_full

COARSE = 1 << 20
FINE = 4096
DIGEST_SIZE = 16
STREAM_WAIT = 300.0  # seconds hashing one block may take before a resync gives up (a stalled disk)


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


def coarse_data_map(fd: int, size: int, coarse: int = COARSE) -> bytearray:
    """One byte per coarse block: 1 if any of it is allocated data, 0 if it is all hole."""
    nblocks = (size + coarse - 1) // coarse
    out = bytearray(nblocks)
    for ext in extents(fd, size):
        if ext.data:
            for i in range(ext.offset // coarse, (ext.offset + ext.length - 1) // coarse + 1):
                out[i] = 1
    return out


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


class StreamClosed(ConnectionError):
    """The block stream was closed (replaced, or abandoned by its consumer)."""


class BlockStream(BlockHasher):
    """Digests of the coarse blocks from `first` on, hashed in disk order by background threads.

    The threads share one descriptor (one read-ahead state for the whole file) and claim runs of
    `claim` blocks in turn, staying at most `ahead` blocks past what `take` consumed: memory stays
    bounded (about `ahead` * 4 KiB of fine digests) and a consumer that stops costs no more
    reading. A stream nobody takes from for `idle_seconds` ends by itself.
    """

    def __init__(
        self,
        path: Path,
        size: int,
        coarse: int = COARSE,
        fine: int = FINE,
        *,
        first: int = 0,
        workers: int = 4,
        ahead: int = 256,
        claim: int = 16,
        idle_seconds: float = 600.0,
    ) -> None:
        super().__init__(path, size, coarse, fine, workers)
        self.position = first  # the next block `take` may return
        self._ahead = ahead
        self._claim = claim
        self._idle = idle_seconds
        self._next = first  # the next block a thread claims
        self._done: dict[int, tuple[bytes, bytes]] = {}
        lock = threading.Lock()
        self._hashed = threading.Condition(lock)  # the consumer waits here
        self._room = threading.Condition(lock)  # threads too far ahead wait here
        self._closed = False
        self._error: OSError | None = None
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            self._data_map = coarse_data_map(fd, size, coarse)
        finally:
            os.close(fd)
        for n in range(workers):
            threading.Thread(target=self._work, name=f"hash-{path.name}-{n}", daemon=True).start()

    @property
    def alive(self) -> bool:
        with self._hashed:
            return not self._closed

    def take(self, idx: int, timeout: float) -> tuple[bytes, bytes]:
        """Coarse digest and fine digests of block `idx` (>= `position`); earlier ones are dropped."""
        deadline = time.monotonic() + timeout
        with self._hashed:
            if idx < self.position:
                raise ValueError(f"block {idx} was already taken (stream at {self.position})")
            if idx > self.position:
                # Skipped blocks are never wanted: drop them and let the threads claim from `idx`
                # (else a skip longer than `ahead` would wait for blocks nobody may hash).
                for gone in range(self.position, idx):
                    self._done.pop(gone, None)
                self.position = idx
                self._next = max(self._next, idx)
                self._room.notify_all()
            while idx not in self._done:
                if self._error is not None:
                    raise self._error
                if self._closed:
                    raise StreamClosed(f"digest stream of {self.path} closed")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"block {idx} of {self.path} not hashed within {timeout:.0f} s")
                self._hashed.wait(left)
            result = self._done.pop(idx)
            self.position = idx + 1
            if self._next - self.position < self._ahead:
                self._room.notify_all()
        return result

    def close(self) -> None:
        with self._hashed:
            self._closed = True
            self._hashed.notify_all()
            self._room.notify_all()

    def _claim_run(self) -> range:
        """The next blocks for this thread; empty when the stream is done or closed."""
        with self._room:
            idle_since = time.monotonic()
            while not self._closed and self.position + self._ahead <= self._next < self.nblocks:
                if time.monotonic() - idle_since > self._idle:
                    self._closed = True
                    self._hashed.notify_all()
                    self._room.notify_all()
                    break
                self._room.wait(1.0)
            if self._closed:
                return range(0)
            run = range(self._next, min(self._next + self._claim, self.nblocks))
            self._next = run.stop
            return run

    def _work(self) -> None:
        buf = bytearray(self.coarse)
        view = memoryview(buf)
        zero_all = zero_coarse_digest(self.coarse, self.fine)
        zero_fines = zero_fine_digests(self.coarse, self.fine)
        fine = self.fine
        digest = xxhash.xxh3_128_digest
        # One descriptor per thread: each claimed run is a sequential stream with its own read-ahead.
        fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            while run := self._claim_run():
                results: list[tuple[int, tuple[bytes, bytes]]] = []
                for idx in run:
                    result = (zero_all, zero_fines)
                    if self._data_map[idx]:
                        n = pread_full(fd, view, idx * self.coarse)
                        if n < self.coarse:
                            view[n:] = bytes(self.coarse - n)
                        self.bytes_read += n
                        if digest(view) != zero_digest(self.coarse):
                            fines = b"".join(
                                [digest(view[o : o + fine]) for o in range(0, self.coarse, fine)]
                            )
                            result = (digest(fines), fines)
                    results.append((idx, result))
                with self._hashed:
                    for idx, result in results:
                        if idx >= self.position:  # else skipped by `take` meanwhile
                            self._done[idx] = result
                    self._hashed.notify_all()
        except OSError as exc:
            with self._hashed:
                self._error = exc
                self._hashed.notify_all()
        finally:
            os.close(fd)


def answer_for(stream: BlockStream, blocks: list[int], have_b64: str, timeout: float) -> bytes:
    """The answer to a peer whose coarse digests of `blocks` (ascending) are `have_b64` (base64 of
    them concatenated): per block, our coarse digest, followed by our fine digests only where the
    two coarse digests differ. ValueError if the request is malformed."""
    have = base64.b64decode(have_b64, validate=True)
    if len(have) != DIGEST_SIZE * len(blocks) or any(b <= a for a, b in itertools.pairwise(blocks)):
        raise ValueError("coarse digests must match ascending block indexes one to one")
    out = bytearray()
    for j, idx in enumerate(blocks):
        coarse_digest, fines = stream.take(idx, timeout)
        out += coarse_digest
        if coarse_digest != have[j * DIGEST_SIZE : (j + 1) * DIGEST_SIZE]:
            out += fines
    return bytes(out)


def differing_runs(local: bytes, remote: bytes) -> Iterator[tuple[int, int]]:
    """Runs [first, end) of fine-block indexes whose digests differ between two fine lists.

    Groups of 16 digests are compared first: with scattered changes most groups are equal, and
    one comparison of 256 bytes costs what one of 16 bytes does.
    """
    group = 16 * DIGEST_SIZE
    count = len(local) // DIGEST_SIZE
    run = -1
    for lo in range(0, len(local), group):
        if local[lo : lo + group] == remote[lo : lo + group]:
            if run >= 0:
                yield run, lo // DIGEST_SIZE
                run = -1
            continue
        for at in range(lo, min(lo + group, len(local)), DIGEST_SIZE):
            same = local[at : at + DIGEST_SIZE] == remote[at : at + DIGEST_SIZE]
            if not same and run < 0:
                run = at // DIGEST_SIZE
            elif same and run >= 0:
                yield run, at // DIGEST_SIZE
                run = -1
    if run >= 0:
        yield run, count
