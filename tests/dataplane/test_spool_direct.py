"""A spool opened with `direct` writes the page-aligned middle of each large frame with O_DIRECT and
its ends through the page cache: every frame reads back whole, live and after a reopen, whatever
its length and wherever it starts; a file system that refuses O_DIRECT leaves the log buffered."""

from __future__ import annotations

import errno
import os
import threading
from pathlib import Path

import pytest
from tests.dataplane.test_spool_defer import file_size_limit, new_pair

from siterecovery.dataplane import direct_write, segment_log
from siterecovery.dataplane.dirty import DirtyBitmap
from siterecovery.dataplane.protocol import HEADER_SIZE, FrameType, encode_frame
from siterecovery.dataplane.segment_log import DIRECT_FRAME, SegmentLog

# Small frames (deferred), frames just under and over the direct threshold, odd lengths that leave
# every later frame unaligned, and 1 MiB ones; segments of 3 MiB so the log rolls several times.
SIZES = [4096, 4096, 1 << 20, 512, (200 << 10) + 123, DIRECT_FRAME - HEADER_SIZE - 1, DIRECT_FRAME, 4096]
SIZES += [(1 << 20) + 7, 1 << 20, 3, (1 << 20) - 5, 4096 * 3] * 3


def _frames() -> list[tuple[int, bytes]]:
    return [
        (seq, encode_frame(FrameType.WRITE, 0, seq, seq * 4096, size, os.urandom(size)))
        for seq, size in enumerate(SIZES, start=1)
    ]


def _write(log: SegmentLog, frames: list[tuple[int, bytes]]) -> list[bytes]:
    """Append or defer each frame as the export does; read the log back after each one."""
    seen: list[bytes] = []
    cursor = log.cursor(-1)
    buf = bytearray(HEADER_SIZE + (2 << 20))
    for seq, frame in frames:
        header, payload = frame[:HEADER_SIZE], memoryview(frame)[HEADER_SIZE:]
        if len(payload) <= 64 << 10 and seq % 2:
            log.defer(seq, header, payload)
        else:
            log.append(seq, header, payload)
        while (item := cursor.next(buf)) is not None:
            seen.append(bytes(item[1]))
    log.settle(wait=True)
    while (item := cursor.next(buf)) is not None:
        seen.append(bytes(item[1]))
    cursor.close()
    return seen


def _read(log: SegmentLog) -> list[bytes]:
    cursor = log.cursor(-1)
    buf = bytearray(HEADER_SIZE + (2 << 20))
    out = []
    while (item := cursor.next(buf)) is not None:
        out.append(bytes(item[1]))
    cursor.close()
    return out


def test_large_frames_go_direct_and_every_frame_reads_back(tmp_path: Path) -> None:
    frames = _frames()
    log = SegmentLog(tmp_path / "spool", segment_bytes=3 << 20, direct=True)
    assert _write(log, frames) == [f for _, f in frames]
    large = sum(len(f) for _, f in frames if len(f) >= DIRECT_FRAME)
    # The aligned middles of the large frames: all but at most a page at each end.
    assert log.direct_bytes >= large - 2 * 4096 * len([f for _, f in frames if len(f) >= DIRECT_FRAME])
    log.sync()
    log.close()
    assert len(list((tmp_path / "spool").glob("*.seg"))) > 3
    reopened = SegmentLog(tmp_path / "spool", segment_bytes=3 << 20, direct=True)
    assert not reopened.damage
    assert _read(reopened) == [f for _, f in frames]
    reopened.close()


def test_refused_o_direct_leaves_the_log_buffered(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(self: direct_write.DirectWriter, view: memoryview, at: int) -> None:
        raise OSError(errno.EINVAL, "Invalid argument")

    monkeypatch.setattr(direct_write.DirectWriter, "_put", refuse)  # what a device with other alignment says
    frames = _frames()
    log = SegmentLog(tmp_path / "spool", segment_bytes=3 << 20, direct=True)
    assert _write(log, frames) == [f for _, f in frames]
    assert log.direct_bytes == 0
    log.close()
    monkeypatch.undo()
    assert _read(SegmentLog(tmp_path / "spool")) == [f for _, f in frames]


def test_batches_are_written_in_the_background_in_order(tmp_path: Path) -> None:
    """Settled batches of 1 MiB frames fly while the caller goes on deferring the next ones; a
    sync waits for the one in flight; every frame reads back in order, also after a reopen."""
    frames = [
        (seq, encode_frame(FrameType.WRITE, 0, seq, seq << 20, size, os.urandom(size)))
        for seq, size in enumerate([1 << 20, (1 << 20) + 512, 4096, 1 << 20] * 6, start=1)
    ]
    log = SegmentLog(tmp_path / "spool", segment_bytes=5 << 20, direct=True)
    flew = 0
    for i in range(0, len(frames), 3):
        log.defer_many(
            [(s, bytearray(f[:HEADER_SIZE]), memoryview(f)[HEADER_SIZE:]) for s, f in frames[i : i + 3]]
        )
        flew += log.settle()
    assert flew  # at least one batch was left to the writer thread
    log.sync()
    assert _read(log) == [f for _, f in frames]
    assert log.direct_bytes > 0
    log.close()
    assert _read(SegmentLog(tmp_path / "spool")) == [f for _, f in frames]


def test_a_batch_that_fails_in_flight_is_tracked_as_dirty_blocks(tmp_path: Path) -> None:
    """The export's settle leaves a batch of 1 MiB writes in flight; its write fails (the file size
    limit); the next settle reports it, and the owner tracks that batch's ranges and the next
    one's as dirty blocks, and nothing of them stays in the spool."""
    pair = new_pair(tmp_path)
    small = memoryview(os.urandom(4096))
    pair.record_write(0, small)
    pair.settle()
    written = pair.spool.last_seq
    big = memoryview(os.urandom(1 << 20))
    with file_size_limit(8192):  # the writer thread's write fails
        pair.record_writes([(1 << 20, big), (5 << 20, big)])  # one NBD batch of 2 MiB
        pair.settle()  # handed to the writer thread: no error yet
        pair.record_writes([(9 << 20, small)])
        pair.settle()  # lands the failed batch: both batches go to the dirty bitmap
    assert pair.dirty_mode
    assert pair.spool.last_seq == written
    pair.flush()  # saves the bitmap
    expected = DirtyBitmap(tmp_path / "expected.bitmap", 16 << 20)
    for offset, length in ((1 << 20, 1 << 20), (5 << 20, 1 << 20), (9 << 20, 4096)):
        expected.mark(offset, length)
    assert DirtyBitmap(pair.dir / "dirty.bitmap", 16 << 20).indexes() == expected.indexes()
    pair.spool.close()


def test_a_sync_waits_for_the_batch_in_flight(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A FLUSH's sync covers a batch the writer thread is still writing: it returns only once that
    batch is written (held here at a gate), and readers see the batch only then."""
    gate = threading.Event()
    put = segment_log._put

    def held_put(*args: object, **kwargs: object) -> int:
        if threading.current_thread().name.startswith("spool-"):  # the log's writer thread
            gate.wait(60)
        return put(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(segment_log, "_put", held_put)
    frames = [
        (seq, encode_frame(FrameType.WRITE, 0, seq, seq << 20, 1 << 20, os.urandom(1 << 20)))
        for seq in (1, 2)
    ]
    log = SegmentLog(tmp_path / "spool", direct=True)
    log.defer_many([(s, bytearray(f[:HEADER_SIZE]), memoryview(f)[HEADER_SIZE:]) for s, f in frames])
    assert log.settle()  # left in flight
    synced = threading.Event()
    syncing = threading.Thread(target=lambda: (log.sync(), synced.set()))
    syncing.start()
    try:
        assert not synced.wait(0.5), "sync returned while the batch it covers was still being written"
        assert _read(log) == []  # not published before it is written
    finally:
        gate.set()
        syncing.join(60)
    assert synced.is_set()
    assert _read(log) == [f for _, f in frames]
    log.close()
