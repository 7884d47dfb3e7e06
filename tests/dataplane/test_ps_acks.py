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

    def sync(idx: int) -> None:
        events.put(("sync-start", cache.last_seq))
        cache.sync()
        events.put(("sync-end", idx))

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

    def fake_failing_sync(idx: int) -> None:
        raise OSError(5, "Input/output error")

    acker = Acker("p", fake_failing_sync, lambda idx, seq: events.put("ack"), lambda: events.put("broken"))
    try:
        acker.request({0: 1})
        assert events.get(timeout=30) == "broken"
        assert events.empty()
    finally:
        acker.stop()
