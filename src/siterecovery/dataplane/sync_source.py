"""The chunks an agent sends for a sync: full copy, delta resync, or dirty blocks.

Each generator yields `Chunk`s in disk order; a data chunk's bytes are in the caller's reused
buffer (valid until the next chunk) together with their digest, so nothing is hashed twice. Holes
(SEEK_DATA/SEEK_HOLE) are never read and, like blocks that read as zeroes, become ZERO chunks,
merged into one range, which keeps the target sparse and makes an empty disk cost next to nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

from siterecovery.dataplane.blocks import (
    COARSE,
    DIGEST_SIZE,
    FINE,
    BlockHasher,
    coarse_data_map,
    pread_full,
    zero_digest,
)
from siterecovery.dataplane.dirty import DirtyBitmap
from siterecovery.dataplane.protocol import digest
from siterecovery.dataplane.replica import SyncPlan


@dataclass(frozen=True, slots=True)
class Chunk:
    seq: int
    offset: int
    length: int
    zero: bool
    digest: bytes = b""


class Progress:
    """Bytes of the disk covered so far by a sync (observable while it runs)."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.done = 0


def _read_chunk(fd: int, view: memoryview, plan: SyncPlan, offset: int, length: int) -> Chunk:
    n = pread_full(fd, view[:length], offset)
    if n < length:
        view[n:length] = bytes(length - n)
    d = digest(view[:length])
    if d == zero_digest(length):
        return Chunk(plan.seq_for(offset), offset, length, True)
    return Chunk(plan.seq_for(offset), offset, length, False, d)


def full_copy(
    fd: int, size: int, plan: SyncPlan, start: int, view: memoryview, progress: Progress
) -> Iterator[Chunk]:
    """Every coarse block from `start`: data read and sent, holes and zero blocks as ZERO ranges."""
    data_map = coarse_data_map(fd, size, COARSE)
    zero_from = -1
    for idx in range(start // COARSE, len(data_map)):
        offset = idx * COARSE
        length = min(COARSE, size - offset)
        chunk = _read_chunk(fd, view, plan, offset, length) if data_map[idx] else None
        if chunk is None or chunk.zero:
            if zero_from < 0:
                zero_from = offset
        else:
            if zero_from >= 0:
                yield Chunk(plan.seq_for(zero_from), zero_from, offset - zero_from, True)
                zero_from = -1
            yield chunk
        progress.done = offset + length
    if zero_from >= 0:
        yield Chunk(plan.seq_for(zero_from), zero_from, size - zero_from, True)
    progress.done = size


def delta(
    fd: int,
    hasher: BlockHasher,
    remote_coarse: bytes,
    fetch_fine: Callable[[list[int]], bytes],
    plan: SyncPlan,
    start: int,
    view: memoryview,
    progress: Progress,
) -> Iterator[Chunk]:
    """Only the fine blocks whose digests differ from the target's, coalesced into runs."""
    local_coarse = hasher.coarse_digests()
    size = hasher.size
    per = hasher.coarse // hasher.fine
    differ = [
        i
        for i in range(start // hasher.coarse, hasher.nblocks)
        if local_coarse[i * DIGEST_SIZE : (i + 1) * DIGEST_SIZE]
        != remote_coarse[i * DIGEST_SIZE : (i + 1) * DIGEST_SIZE]
    ]
    progress.done = start
    batch_size = 256
    for b in range(0, len(differ), batch_size):
        batch = differ[b : b + batch_size]
        remote_fine = fetch_fine(batch)
        for j, idx in enumerate(batch):
            local = hasher.fine_digests(idx)
            remote = remote_fine[j * per * DIGEST_SIZE : (j + 1) * per * DIGEST_SIZE]
            base = idx * hasher.coarse
            run = -1
            for k in range(per + 1):
                same = k == per or (
                    local[k * DIGEST_SIZE : (k + 1) * DIGEST_SIZE]
                    == remote[k * DIGEST_SIZE : (k + 1) * DIGEST_SIZE]
                )
                if not same and run < 0:
                    run = k
                elif same and run >= 0:
                    offset = base + run * hasher.fine
                    end = min(base + k * hasher.fine, size)
                    if end > offset:
                        yield _read_chunk(fd, view, plan, offset, end - offset)
                    run = -1
            progress.done = min(base + hasher.coarse, size)
    progress.done = size


def dirty_blocks(
    fd: int, bitmap: DirtyBitmap, plan: SyncPlan, start: int, view: memoryview, progress: Progress
) -> Iterator[Chunk]:
    """The blocks marked dirty while the spool was full, read as they are now."""
    progress.total = bitmap.count() * bitmap.granularity
    for offset, length in bitmap.runs():
        end = offset + length
        pos = max(offset, start - start % FINE)
        while pos < end:
            n = min(COARSE - pos % COARSE, end - pos)
            yield _read_chunk(fd, view, plan, pos, n)
            pos += n
            progress.done += n
