"""Frames the process server forwards from memory, acknowledged to the agent on the master target's ACK.

Caching every frame cost a full sync three passes over each byte on the process server besides
TLS — the write into the cache, the read back to forward it, and the fsync's disk write that
doubled the box's disk traffic (the master target writes the same bytes to the replica) — to
acknowledge a frame the agent can always send again: until the process server acknowledges it,
a sync's block stays on the agent's disk and a captured write in its spool, and after a
reconnect the agent resends everything after the acknowledged sequence (issue 16).

So while a pair's link to the master target is up, a received frame is held here instead of being
cached: the forwarder sends it from memory, after whatever the cache still holds, and it is
acknowledged to the agent only once the master target acknowledged it (durably applied to the
replica). When the pair's budget is used, the receive thread waits for room: the agent is slowed
to the master target's pace, as `nbdcopy`'s source is to its destination's. PS-1 holds: nothing
acknowledged lives only in memory. A process server that crashes loses the held frames; the agent,
never told they were durable, resends them.

Held frames are always the newest of the pair: a frame is cached only after everything held was
*spilled* — appended to the cache in order — so a pair's cache and its held frames together are
its sequence in order, cached frames first. Frames are spilled and cached while the link is down,
when the master target has made no room for `ROOM_WAIT` seconds, and when it has acknowledged
nothing held for `ROOM_WAIT` seconds (a paused or frozen pair: the cache then acknowledges them, so
the agent's acknowledgement never waits on a stalled master target for longer than that); after
that, and after a link down long enough to cache more than `HOLD_BEHIND`, frames are cached until
the forwarder has caught up with the cache (the cache absorbs a stalled master target, as before).
"""

from __future__ import annotations

import threading
import time
from collections import deque

from siterecovery.dataplane.protocol import HEADER_SIZE, FrameType, Header

# Per pair, bytes of frames held (about two of the master target's acknowledgement batches of 32 MiB:
# the next batch arrives while the previous one is synced and acknowledged).
PAIR_BUDGET = 96 << 20
# Per process server, over every pair: a process server with many pairs in a full sync caches
# what its memory would not hold.
SERVER_BUDGET = 384 << 20
# How long a receive thread waits for the master target to make room before it spills.
ROOM_WAIT = 1.0
# Frames are held behind at most this much still cached (those cached before the link came up).
HOLD_BEHIND = 32 << 20
OWN_BUFFER = 64 << 10  # data frames with at least this much payload are received into their own buffer
# Buffers of acknowledged frames kept for the next frames received, over every pair: the master
# target acknowledges a batch of up to 32 MiB at a time, and the receive thread keeps up to
# PAIR_BUDGET held meanwhile (16 MiB reused 40 % of the buffers of a full sync, 64 MiB 88 %).
# Emptied once nothing is held (`Pool.clear`).
POOL_BYTES = 64 << 20


class Pool:
    """Buffers for large data frames, each received into one of its own (`FrameReader.read`'s
    `place`) and held in memory as received: copying each MiB of a sync out of the reader's buffer
    was a tenth of the receive thread. A fresh `bytearray` is zero-filled (and its pages faulted
    in), 6-7 % of the process server's CPU in a full sync, so a frame's buffer is reused — only
    once the master target acknowledged the frame and the forwarder's send of it returned
    (`Held.release`): nothing else refers to it then. A spilled frame's buffer is not reused.
    Thread-safe; a reused buffer is overwritten whole (header and payload) before it is read."""

    def __init__(self, limit: int = POOL_BYTES) -> None:
        self.limit = limit
        self._lock = threading.Lock()
        self._free: dict[int, list[bytearray]] = {}
        self.bytes = 0

    def place(self, h: Header) -> bytearray | None:
        """A buffer of HEADER_SIZE + payload bytes for a large data frame; None for other frames."""
        if h.type not in (FrameType.WRITE, FrameType.BLOCK) or h.payload_len < OWN_BUFFER:
            return None
        n = HEADER_SIZE + h.payload_len
        with self._lock:
            free = self._free.get(n)
            if free:
                self.bytes -= n
                return free.pop()
        return bytearray(n)

    def clear(self) -> None:
        """Let every buffer go (nothing is held: a sync ended; an idle server keeps no pool)."""
        with self._lock:
            self._free.clear()
            self.bytes = 0

    def give(self, buf: bytearray) -> None:
        n = len(buf)
        if n < HEADER_SIZE + OWN_BUFFER:
            return
        with self._lock:
            if self.bytes + n <= self.limit:
                self._free.setdefault(n, []).append(buf)
                self.bytes += n


class Budget:
    """Bytes held across a process server's pairs (thread-safe)."""

    def __init__(self, limit: int = SERVER_BUDGET) -> None:
        self.limit = limit
        self._lock = threading.Lock()
        self.used = 0

    def take(self, n: int) -> bool:
        with self._lock:
            if self.used + n > self.limit:
                return False
            self.used += n
            return True

    def give(self, n: int) -> None:
        with self._lock:
            self.used -= n


class Held:
    """One pair's held frames, in sequence order (see the module's paragraphs). Thread-safe.

    The receive thread `hold`s and `spill`s, the forwarder reads `after` a sequence, the master
    target's ACK `release`s; `last_seq` may be read without the lock (an int, replaced at once).
    """

    def __init__(self, budget: Budget, limit: int = PAIR_BUDGET, pool: Pool | None = None) -> None:
        self._budget = budget
        self._limit = limit
        self._pool = pool  # where the buffers of acknowledged frames go
        self._frames: deque[tuple[Header, bytearray]] = deque()
        self._cond = threading.Condition()
        self.bytes = 0
        self.last_seq = -1  # the newest frame held (-1: none)
        self._progress_at = time.monotonic()  # the first frame held, or the last release

    def __len__(self) -> int:
        return len(self._frames)

    def hold(self, header: Header, frame: bytearray, wait: float = ROOM_WAIT) -> bool:
        """Hold `frame` (header + payload, the pair index 0) if there is room within `wait`
        seconds; False: no room, the caller spills and caches it."""
        n = len(frame)
        with self._cond:
            if not self._cond.wait_for(lambda: self._room(n), wait):
                return False
            if not self._frames:
                self._progress_at = time.monotonic()
            self._frames.append((header, frame))
            self.bytes += n
            self.last_seq = header.seq
            return True

    def _room(self, n: int) -> bool:
        # An empty pair may always hold one frame of any size, within the server's budget.
        if self._frames and self.bytes + n > self._limit:
            return False
        return self._budget.take(n)

    def after(self, seq: int) -> list[tuple[Header, bytearray]]:
        """The frames held with a sequence after `seq`, in order (for the forwarder)."""
        with self._cond:
            newer: list[tuple[Header, bytearray]] = []
            for item in reversed(self._frames):  # from the newest: as many steps as frames handed on
                if item[0].seq <= seq:
                    break
                newer.append(item)
            newer.reverse()
            return newer

    def find(self, seq: int) -> bytearray | None:
        with self._cond:
            return next((frame for h, frame in self._frames if h.seq == seq), None)

    def release(self, seq: int, sent: int = -1) -> bool:
        """The master target acknowledged every frame up to `seq`: drop them; the buffers of those
        up to `sent` (the forwarder's send of each returned) go to the pool. True if any was held."""
        with self._cond:
            freed = 0
            while self._frames and self._frames[0][0].seq <= seq:
                h, buf = self._frames.popleft()
                freed += len(buf)
                if self._pool is not None and h.seq <= sent:
                    self._pool.give(buf)
            if not freed:
                return False
            self._progress_at = time.monotonic()
            self._drop(freed)
            return True

    def stalled(self, seconds: float = ROOM_WAIT) -> bool:
        """Frames are held and the master target has acknowledged none of them for `seconds`."""
        with self._cond:
            return bool(self._frames) and time.monotonic() - self._progress_at >= seconds

    def spill(self) -> list[tuple[Header, bytearray]]:
        """Every frame held, emptied out (the caller appends them to the cache, in order)."""
        with self._cond:
            frames = list(self._frames)
            self._frames.clear()
            self._drop(self.bytes)
            return frames

    def _drop(self, n: int) -> None:
        self.bytes -= n
        self._budget.give(n)
        if not self._frames:
            self.last_seq = -1
        self._cond.notify_all()
