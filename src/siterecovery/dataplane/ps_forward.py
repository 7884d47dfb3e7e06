"""A process server's stream of one pair's frames to its master target, for one session.

The stream sends the cache from the master target's acknowledged sequence on, then the frames held
in memory (`ps_inflight.py`), which are always newer than every cached one. A held frame spilled
into the cache after it went out from memory is met again by the cache's cursor and skipped (its
sequence is not after `sent`).

Frames go out in batches of up to FORWARD_BATCH bytes, sent whenever there is nothing more: one
TLS record and system call per 4 KiB frame was most of the process server's time under small
random writes (as it was the agent sender's). Frames the cache lost (a damaged header,
`segment_log.py`) go out as a header-only MISSING|RESYNC frame in their place; a frame the master
target refused and that was dropped (`healing.py`) as a MISSING one.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from siterecovery.dataplane.assignments import RefusedHop
from siterecovery.dataplane.healing import RefusalLog
from siterecovery.dataplane.protocol import (
    HEADER_SIZE,
    MAX_PAYLOAD,
    Flag,
    FrameType,
    FrameWriter,
    Header,
    ProtocolError,
)
from siterecovery.dataplane.ps_inflight import Held
from siterecovery.dataplane.segment_log import SegmentLog

FORWARD_BATCH = 256 << 10  # bytes of frames gathered into one TLS write to the master target


class Stream:
    """Sends a pair's cache, then its held frames, on one session (see the module's paragraphs).

    `sent` — the newest frame taken so far — may be read from other threads: the receive thread
    holds a frame in memory only once the stream has taken the whole cache.
    """

    def __init__(
        self,
        cache: SegmentLog,
        held: Held,
        refusals: RefusalLog,
        writer: FrameWriter,
        lock: threading.Lock,
        acked: int,
    ) -> None:
        self.sent = acked
        self._cache = cache
        self._held = held
        self._refusals = refusals
        self._writer = writer
        self._lock = lock  # the session's writer is shared with relayed queries
        self._lost = sorted(
            e.seq for e in refusals.entries() if e.resync and not e.healed and e.hop is RefusedHop.CACHE
        )
        self._batch = bytearray()
        self._waiting = False  # the stream waits for a frame (under the cache's lock)

    def wake(self) -> None:
        """A frame was held for the stream: wake it if it waits (a notify per frame cost more)."""
        if self._waiting:
            with self._cache.appended:
                self._cache.appended.notify_all()

    def run(
        self,
        running: Callable[[], bool],
        repair: Callable[[], None],
        note: Callable[[int], None],
        idle: Callable[[], None] = lambda: None,
    ) -> None:
        """Send until `running()` turns false; `repair()` on a damaged cache header (then raise),
        `note(n)` for the bytes of each frame forwarded, `idle()` whenever it found nothing to send."""
        cursor = self._cache.cursor(self.sent)
        buf = bytearray(HEADER_SIZE + MAX_PAYLOAD)
        try:
            while running():
                try:
                    item = cursor.next(buf)
                except ProtocolError:
                    repair()  # a damaged header; the next session resumes past it
                    raise
                if item is not None:
                    if item[0].seq > self.sent:  # else: spilled after it went out from memory
                        self._forward(*item, note)
                    continue
                held = self._held.after(self.sent)
                for h, frame in held:
                    with memoryview(frame) as view:
                        self._forward(h, view, note)
                if held:
                    continue
                self._send_batch()
                idle()
                with self._cache.appended:
                    # Waiting is set before the check: `wake` after a frame held since then sees it.
                    self._waiting = True
                    if self._held.last_seq <= self.sent:
                        self._cache.appended.wait(0.2)
                    self._waiting = False
        finally:
            cursor.close()

    def _send_batch(self) -> None:
        if self._batch:
            with self._lock, memoryview(self._batch) as view:
                self._writer.send_raw(view)
            self._batch.clear()

    def _forward(self, h: Header, frame: memoryview, note: Callable[[int], None]) -> None:
        lost, writer = self._lost, self._writer
        if lost and lost[0] < h.seq:
            self._send_batch()
        while lost and lost[0] < h.seq:
            with self._lock:
                writer.send(FrameType.WRITE, 0, lost.pop(0), 0, 0, b"", Flag.MISSING | Flag.RESYNC)
        if self._refusals.dropped(h.seq):
            # The damaged frame stays out of the stream; the master target learns its write is
            # missing until the agent's re-read of the range arrives.
            self._send_batch()
            with self._lock:
                writer.send(h.type, 0, h.seq, h.offset, h.length, b"", Flag.MISSING)
        else:
            if len(frame) >= FORWARD_BATCH:
                self._send_batch()
                with self._lock:
                    writer.send_raw(frame)
            else:
                self._batch += frame
                if len(self._batch) >= FORWARD_BATCH:
                    self._send_batch()
            note(len(frame))
        self.sent = h.seq
