"""The agent's spool takes the writes of one NBD batch in memory and writes them out together.

Deferred frames are invisible to readers (cursors, the shared tail) until `settle`, stay in
sequence order with frames appended at once, are written by `sync` (a FLUSH) and keep their segment
from being freed. A write-out that fails (here a real EFBIG from a file-size limit) loses nothing:
the pair tracks the batch's ranges in its dirty bitmap, as when the spool is over its limit.
"""

from __future__ import annotations

import contextlib
import os
import resource
import signal
from collections.abc import Iterator
from pathlib import Path

from tests.dataplane.test_segment_log import read_all

from siterecovery.dataplane.assignments import DiskReplication
from siterecovery.dataplane.dirty import GRANULARITY, DirtyBitmap
from siterecovery.dataplane.protocol import HEADER_SIZE, FrameType, encode_frame, parse_header
from siterecovery.dataplane.replica import PairReplication
from siterecovery.dataplane.segment_log import SegmentLog
from siterecovery.dataplane.spool_tail import SpoolTail


def _frames(seqs: range) -> dict[int, bytes]:
    return {s: encode_frame(FrameType.WRITE, 0, s, s * 4096, 4096, os.urandom(4096)) for s in seqs}


def test_deferred_frames_are_written_together_in_order_and_kept_until_written(tmp_path: Path) -> None:
    frames = _frames(range(1, 8))
    log = SegmentLog(tmp_path / "spool")
    tail = SpoolTail(tmp_path / "spool.tail")
    log.share_tail(tail)
    for s in (1, 2, 3):
        log.defer(s, frames[s][:HEADER_SIZE], frames[s][HEADER_SIZE:])
    assert read_all(log) == [] and tail.read().last_seq == -1  # not written yet: nobody reads them
    assert log.last_seq == 3 and log.bytes_used == 3 * len(frames[1])
    log.settle()
    assert read_all(log) == [frames[s] for s in (1, 2, 3)] and tail.read().last_seq == 3

    log.defer(4, frames[4][:HEADER_SIZE], frames[4][HEADER_SIZE:])
    log.free_through(3)  # every written frame acknowledged: the segment still holds frame 4
    log.append(5, frames[5][:HEADER_SIZE], frames[5][HEADER_SIZE:])  # after the deferred one
    assert read_all(log) == [frames[s] for s in range(1, 6)]  # not freed: it holds frame 4
    log.free_through(5)
    log.defer(6, frames[6][:HEADER_SIZE], frames[6][HEADER_SIZE:])
    log.defer(7, frames[7][:HEADER_SIZE], frames[7][HEADER_SIZE:])
    log.sync()  # a FLUSH: deferred frames are written and made durable
    log.close()
    tail.close()
    assert read_all(SegmentLog(tmp_path / "spool")) == [frames[6], frames[7]]


def new_pair(tmp_path: Path, **kwargs: int) -> PairReplication:
    """A pair of a 16 MiB image (no process server or master target behind it)."""
    image = tmp_path / "disk.img"
    with open(image, "wb") as f:
        f.truncate(16 << 20)
    spec = DiskReplication(pair_id="p", disk="d", process_server="127.0.0.1:1", master_target="127.0.0.1:2")
    return PairReplication(spec, image, tmp_path / "agent", **kwargs)


@contextlib.contextmanager
def file_size_limit(limit: int) -> Iterator[None]:
    """Any write past `limit` bytes into a file fails with a real EFBIG meanwhile."""
    limits = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limits[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        signal.signal(signal.SIGXFSZ, previous)


def test_a_batch_that_cannot_be_written_is_tracked_as_dirty_blocks(tmp_path: Path) -> None:
    pair = new_pair(tmp_path)
    data = memoryview(os.urandom(4096))
    pair.record_write(0, data)
    pair.settle()
    written = pair.spool.last_seq
    pair.record_writes([(1 << 20, data), (5 << 20, data)])  # one NBD batch
    with file_size_limit(4096):  # the spool segment is already larger
        pair.settle()
    assert pair.dirty_mode
    assert pair.spool.last_seq == written  # the batch was dropped from the spool ...
    pair.flush()  # saves the bitmap
    dirty = DirtyBitmap(pair.dir / "dirty.bitmap", 16 << 20)
    assert dirty.indexes() == [(1 << 20) // GRANULARITY, (5 << 20) // GRANULARITY]  # ... into it
    pair.spool.close()


def test_a_batch_is_spooled_as_one_frame_per_write_in_order(tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    with open(image, "wb") as f:
        f.truncate(16 << 20)
    spec = DiskReplication(pair_id="p", disk="d", process_server="127.0.0.1:1", master_target="127.0.0.1:2")
    pair = PairReplication(spec, image, tmp_path / "agent", spool_limit=3 * (HEADER_SIZE + 4096))
    first = pair.captured_seq + 1
    writes = [(o, memoryview(os.urandom(4096))) for o in (8192, 0, 8192)]  # a rewrite comes last
    pair.record_writes(writes)
    pair.settle()
    frames = [parse_header(memoryview(f)[:HEADER_SIZE]) for f in read_all(pair.spool)]
    expected = [(first + i, offset, 4096) for i, (offset, _) in enumerate(writes)]
    assert [(h.seq, h.offset, h.length) for h in frames] == expected
    assert [f[HEADER_SIZE:] for f in read_all(pair.spool)] == [bytes(d) for _, d in writes]
    assert not pair.dirty_mode
    pair.record_writes([(4096, writes[0][1])])  # past the spool's limit after this batch
    assert pair.dirty_mode and pair.captured_seq == first + 3
    pair.spool.close()
