"""The sender child reads the agent's spool up to the tail the agent publishes, never past it.

Both ends run here in one process but share nothing but the files: the writer's `SegmentLog`
with its `SpoolTail`, the reader's `TailLog` over a second mapping of the same tail file.
"""

from __future__ import annotations

import os
from pathlib import Path

from siterecovery.dataplane.protocol import HEADER_SIZE, FrameType, encode_frame
from siterecovery.dataplane.remote_pair import TailCursor, TailLog
from siterecovery.dataplane.segment_log import SegmentLog
from siterecovery.dataplane.spool_tail import SpoolTail


def _frame(seq: int) -> bytes:
    return encode_frame(FrameType.WRITE, 0, seq, seq * 4096, 4096, os.urandom(4096))


def _drain(cursor: TailCursor, buf: bytearray) -> list[int]:
    seqs = []
    while (item := cursor.next(buf)) is not None:
        seqs.append(item[0].seq)
    return seqs


def test_reader_follows_rolls_and_frees_and_stops_at_the_published_tail(tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    log = SegmentLog(spool, segment_bytes=3 * (HEADER_SIZE + 4096))  # a new segment every 3 frames
    log.share_tail(SpoolTail(tmp_path / "spool.tail"))
    reader = TailLog(spool, SpoolTail(tmp_path / "spool.tail"))
    cursor = reader.cursor(-1)
    buf = bytearray(HEADER_SIZE + 8192)
    assert cursor.next(buf) is None and reader.last_seq == -1
    frames = {s: _frame(s) for s in range(1, 11)}
    for seq in range(1, 8):
        log.append(seq, frames[seq][:HEADER_SIZE], frames[seq][HEADER_SIZE:])
    got = []
    while (item := cursor.next(buf)) is not None:
        assert bytes(item[1]) == frames[item[0].seq]
        got.append(item[0].seq)
    assert got == list(range(1, 8)) and reader.last_seq == 7

    # A frame being appended (bytes in the file past the published tail) is not read.
    current = max(spool.glob("*.seg"))
    with open(current, "ab") as f:
        f.write(frames[8][: HEADER_SIZE + 100])
    assert cursor.next(buf) is None
    os.truncate(current, current.stat().st_size - HEADER_SIZE - 100)

    # Acknowledged segments are freed under the reader; it goes on with what follows.
    log.free_through(6)
    for seq in range(8, 11):
        log.append(seq, frames[seq][:HEADER_SIZE], frames[seq][HEADER_SIZE:])
    assert _drain(cursor, buf) == [8, 9, 10]
    # A new reader (a restarted child) resumes after what the process server holds.
    assert _drain(reader.cursor(8), buf) == [9, 10]
    cursor.close()
    log.close()
