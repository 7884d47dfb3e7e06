"""The process server acknowledges on its own thread, only after the cache's fsync (PS-1)."""

from __future__ import annotations

import queue
from pathlib import Path

from siterecovery.dataplane.protocol import HEADER_SIZE, FrameType, encode_frame
from siterecovery.dataplane.ps_acks import Acker
from siterecovery.dataplane.segment_log import SegmentLog


def test_acknowledged_only_after_the_fsync_that_covers_it(tmp_path: Path) -> None:
    cache = SegmentLog(tmp_path / "cache")
    events: queue.Queue[tuple[str, int]] = queue.Queue()

    def sync(idx: int) -> int:
        last = cache.last_seq
        events.put(("sync-start", last))
        cache.sync()
        events.put(("sync-end", idx))
        return last

    acker = Acker("p", sync, lambda idx, seq: events.put(("ack", seq)), lambda: events.put(("broken", 0)))
    try:
        for seq in (1, 2, 3):
            frame = encode_frame(FrameType.WRITE, 0, seq, seq * 4096, 4096, bytes([seq]) * 4096)
            cache.append(seq, frame[:HEADER_SIZE], frame[HEADER_SIZE:])
        acker.request({0: 3})
        assert events.get(timeout=30) == ("sync-start", 3)  # everything up to 3 appended before it
        assert events.get(timeout=30) == ("sync-end", 0)
        assert events.get(timeout=30) == ("ack", 3)
    finally:
        acker.stop()
        cache.close()


def test_a_failed_sync_ends_the_session_without_an_ack(tmp_path: Path) -> None:
    events: queue.Queue[str] = queue.Queue()

    def fake_failing_sync(idx: int) -> int:
        raise OSError(5, "Input/output error")

    acker = Acker("p", fake_failing_sync, lambda idx, seq: events.put("ack"), lambda: events.put("broken"))
    try:
        acker.request({0: 1})
        assert events.get(timeout=30) == "broken"
        assert events.empty()
    finally:
        acker.stop()


def test_no_more_is_acknowledged_than_the_sync_made_durable(tmp_path: Path) -> None:
    """Frames held in memory (`ps_inflight.py`) are newer than the cache: a sync does not cover
    them, and the acknowledgement stops at what it did cover (nothing at all when that is none)."""
    durable = iter((5, -1, 9))
    synced: queue.Queue[int] = queue.Queue()

    def sync(idx: int) -> int:
        value = next(durable)
        synced.put(value)
        return value

    acks: queue.Queue[tuple[int, int]] = queue.Queue()
    acker = Acker("p", sync, lambda i, s: acks.put((i, s)), lambda: None)
    try:
        acker.request({0: 7})  # 6 and 7 held in memory: only 5 is durable
        assert acks.get(timeout=30) == (0, 5)
        acker.request({0: 8})  # nothing durable: no acknowledgement at all ...
        assert synced.get(timeout=30) == 5 and synced.get(timeout=30) == -1
        acker.request({0: 8})
        assert acks.get(timeout=30) == (0, 8)  # ... so the next one seen is the third sync's
        assert acks.empty()
    finally:
        acker.stop()
