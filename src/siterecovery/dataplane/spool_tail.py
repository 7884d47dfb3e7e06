"""Where a pair's spool ends, shared between the agent's export and its sender child in memory.

The export appends frames to the spool's segment files; the sender, in its own process
(`sender_process.py`), reads them back. It must never read a frame the export is still writing,
and it must learn of new frames without a system call per write: the export publishes, after each
append, the current segment (its first sequence), how many bytes of it hold whole frames and the
newest sequence, into a small file both processes map (`MAP_SHARED`). A publish is a few stores
into memory; the sender polls the tail when it has nothing left to send.

The three tail fields are written under the spool's lock and read with a sequence lock (a counter
that is odd while a write is in progress), so a reader never sees a segment paired with another
segment's size. A separate counter, bumped whenever the pair's persisted state changes (a sync
planned or done, dirty mode, frames lost), tells the sender to fetch that state again.

One more field says whether the export is saturated: the agent's export measures the share of wall
time its event-loop thread spends on requests and, while that share is high, publishes until when
it counts as saturated (a `time.monotonic()` instant: the clock is the machine's, the same in both
processes). The sender holds its spooled frames back meanwhile (`sender.py`): during a burst the
spool absorbs the writes and the CPU goes to the export, not to the sender and the process server
and master target it feeds. Two aligned 8-byte values (until when, the last busy share), written
by the export's thread only: a hint, read without the lock.

Two more values are read by whoever watches the pair (the capture bench) without asking either
process: the newest sequence the pair has allocated (`captured`: written frames, writes only marked
dirty, syncs) and the seconds the sender has held frames back so far (`held`), each written by one
process only (the agent's capture path, the sender child).
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path

_COUNTER = struct.Struct("<q")  # the sequence lock, at offset 0
_TAIL = struct.Struct("<qqq")  # segment's first sequence, its whole bytes, last sequence, at 8
_STATE = struct.Struct("<q")  # state generation, at offset 32
_STATE_AT = 32
_LOAD = struct.Struct("<dd")  # saturated until (monotonic s), the last busy share, at 40
_LOAD_AT = 40
_CAPTURED = struct.Struct("<q")  # the newest sequence allocated, at 56 (the agent's capture path)
_CAPTURED_AT = 56
_HELD = struct.Struct("<d")  # seconds the sender has held frames back in all, at 64 (the sender)
_HELD_AT = 64
_SIZE = 128


@dataclass(frozen=True)
class Tail:
    segment_first: int  # first sequence of the segment appended to last (-1: nothing published)
    segment_bytes: int  # bytes of whole frames in it
    last_seq: int  # the newest frame in the spool (-1: none)


class SpoolTail:
    """The shared tail of one spool (see the module docstring)."""

    def __init__(self, path: Path) -> None:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            if os.fstat(fd).st_size < _SIZE:
                os.ftruncate(fd, _SIZE)
            self._map = mmap.mmap(fd, _SIZE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
        self.path = path

    def publish(self, segment_first: int, segment_bytes: int, last_seq: int) -> None:
        """The spool holds whole frames up to here (called with the spool's lock held)."""
        counter = _COUNTER.unpack_from(self._map, 0)[0]
        _COUNTER.pack_into(self._map, 0, counter + 1)  # odd: a write is in progress
        _TAIL.pack_into(self._map, 8, segment_first, segment_bytes, last_seq)
        _COUNTER.pack_into(self._map, 0, counter + 2)

    def read(self) -> Tail:
        while True:
            before = _COUNTER.unpack_from(self._map, 0)[0]
            first, size, last = _TAIL.unpack_from(self._map, 8)
            after = _COUNTER.unpack_from(self._map, 0)[0]
            if before == after and not before & 1:
                return Tail(first, size, last)

    def state_changed(self) -> None:
        """The pair's persisted state changed: its sender fetches it again."""
        _STATE.pack_into(self._map, _STATE_AT, self.state_generation + 1)

    def publish_load(self, saturated_until: float, busy: float) -> None:
        """The export counts as saturated until `saturated_until`; `busy` is its last measured share."""
        _LOAD.pack_into(self._map, _LOAD_AT, saturated_until, busy)

    @property
    def saturated_until(self) -> float:
        return float(_LOAD.unpack_from(self._map, _LOAD_AT)[0])

    @property
    def busy(self) -> float:
        """The export's last published busy share (0..1)."""
        return float(_LOAD.unpack_from(self._map, _LOAD_AT)[1])

    def publish_captured(self, seq: int) -> None:
        """The pair has allocated sequences up to `seq` (called with the pair's lock held)."""
        _CAPTURED.pack_into(self._map, _CAPTURED_AT, seq)

    @property
    def captured(self) -> int:
        return int(_CAPTURED.unpack_from(self._map, _CAPTURED_AT)[0])

    def add_held(self, seconds: float) -> None:
        """The sender held frames back for `seconds` more (the sender's thread only)."""
        _HELD.pack_into(self._map, _HELD_AT, self.held + seconds)

    @property
    def held(self) -> float:
        """Seconds the sender has held spooled frames back since the tail was created."""
        return float(_HELD.unpack_from(self._map, _HELD_AT)[0])

    @property
    def state_generation(self) -> int:
        return int(_STATE.unpack_from(self._map, _STATE_AT)[0])

    def close(self) -> None:
        self._map.close()
