"""The chunks an agent sends for a sync: full copy, delta resync, or dirty blocks.

Each generator yields `Chunk`s in disk order; a data chunk's bytes are in the caller's reused
buffer (valid until the next chunk) together with their digest, so nothing is hashed twice. Holes
(SEEK_DATA/SEEK_HOLE) are never read and, like blocks that read as zeroes, become ZERO chunks,
merged into one range, which keeps the target sparse and makes an empty disk cost next to nothing.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import xxhash

from siterecovery.dataplane.blocks import (
    COARSE,
    DIGEST_SIZE,
    FINE,
    STREAM_WAIT,
    BlockHasher,
    BlockStream,
    coarse_data_map,
    differing_runs,
    zero_digest,
)
from siterecovery.dataplane.dirty import DirtyBitmap
from siterecovery.dataplane.fileio import pread_full
from siterecovery.dataplane.protocol import ProtocolError, digest
from siterecovery.dataplane.replica import SyncPlan

# A delta resync asks for the target's digests REGION coarse blocks at a time, DEPTH regions ahead.
REGION = 16
DEPTH = 8

# Told the ranges [offset, stop) of a region just before they are read and sent.
Hint = Callable[[list[tuple[int, int]]], None]


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
    stream: BlockStream,
    ask: Callable[[list[int], bytes], int],
    answer: Callable[[int], bytes],
    plan: SyncPlan,
    start: int,
    view: memoryview,
    progress: Progress,
    hint: Hint | None = None,
) -> Iterator[Chunk]:
    """Only the fine blocks whose digests differ from the target's, coalesced into runs.

    `stream` hashes this side from `start`'s coarse block on. Region by region, `ask` sends our
    coarse digests and returns a ticket; `answer(ticket)` waits for the target's reply (see
    `blocks.answer_for`). Up to `DEPTH` regions are asked ahead, so both ends keep reading while
    the differing blocks of earlier regions are compared and sent. `hint` is told each region's
    ranges before they are sent (the master target reads what they replace ahead, `prefetch`).
    """
    size = stream.size
    coarse, fine = stream.coarse, stream.fine
    pending: deque[tuple[list[int], list[tuple[bytes, bytes]], int]] = deque()
    next_idx = start // coarse
    progress.done = start
    while next_idx < stream.nblocks or pending:
        if next_idx < stream.nblocks and len(pending) < DEPTH:
            blocks = list(range(next_idx, min(next_idx + REGION, stream.nblocks)))
            local = [stream.take(i, STREAM_WAIT) for i in blocks]
            pending.append((blocks, local, ask(blocks, b"".join(c for c, _ in local))))
            next_idx = blocks[-1] + 1
            continue
        blocks, local, ticket = pending.popleft()
        remote = answer(ticket)
        ranges = _differing(size, coarse, fine, blocks, local, remote)
        yield from _read_ranges(fd, view, plan, ranges, hint)
        progress.done = min((blocks[-1] + 1) * coarse, size)
    progress.done = size


def _differing(
    size: int,
    coarse: int,
    fine: int,
    blocks: list[int],
    local: list[tuple[bytes, bytes]],
    remote: bytes,
) -> list[tuple[int, int]]:
    """The ranges [offset, stop) of `blocks` where our digests (`local`) and the target's answer
    (`remote`) differ."""
    fine_bytes = coarse // fine * DIGEST_SIZE
    out: list[tuple[int, int]] = []
    at = 0
    for idx, (ours, fines) in zip(blocks, local, strict=True):
        theirs = remote[at : at + DIGEST_SIZE]
        at += DIGEST_SIZE
        base = idx * coarse
        if theirs != ours:
            their_fines = remote[at : at + fine_bytes]
            at += fine_bytes
            if len(their_fines) != fine_bytes:
                raise ProtocolError(f"digest answer too short for coarse block {idx}")
            for first, end in differing_runs(fines, their_fines):
                offset, stop = base + first * fine, min(base + end * fine, size)
                if stop > offset:
                    out.append((offset, stop))
    if at != len(remote):
        raise ProtocolError(f"digest answer of {len(remote)} bytes, expected {at}")
    return out


def _read_ranges(
    fd: int, view: memoryview, plan: SyncPlan, ranges: list[tuple[int, int]], hint: Hint | None
) -> Iterator[Chunk]:
    if hint is not None and ranges:
        hint(ranges)
    for offset, stop in ranges:
        yield _read_chunk(fd, view, plan, offset, stop - offset)


def delta_blocks(
    fd: int,
    hasher: BlockHasher,
    blocks: list[int],
    ask: Callable[[list[int], bytes], int],
    answer: Callable[[int], bytes],
    plan: SyncPlan,
    start: int,
    view: memoryview,
    progress: Progress,
    hint: Hint | None = None,
) -> Iterator[Chunk]:
    """`delta` restricted to some coarse blocks (ascending): those an unclean stop left marked.

    Our digests come from `hasher`, which reads only these blocks; the target answers them from
    its digest stream, which skips the blocks in between.
    """
    coarse, fine = hasher.coarse, hasher.fine
    todo = [i for i in blocks if (i + 1) * coarse > start]
    progress.total, progress.done = len(todo) * coarse, 0
    pending: deque[tuple[list[int], list[tuple[bytes, bytes]], int]] = deque()
    pos = 0
    while pos < len(todo) or pending:
        if pos < len(todo) and len(pending) < DEPTH:
            group = todo[pos : pos + REGION]
            pos += len(group)
            local = []
            for idx in group:
                fines = hasher.fine_digests(idx)
                local.append((xxhash.xxh3_128_digest(fines), fines))
            pending.append((group, local, ask(group, b"".join(c for c, _ in local))))
            continue
        group, local, ticket = pending.popleft()
        remote = answer(ticket)
        ranges = _differing(hasher.size, coarse, fine, group, local, remote)
        yield from _read_ranges(fd, view, plan, ranges, hint)
        progress.done += len(group) * coarse
    progress.done = progress.total


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
