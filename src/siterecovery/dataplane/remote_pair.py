"""A pair as its sender child sees it: the spool read from disk, the state asked of the agent.

The agent's process owns the pair (`replica.PairReplication`): it captures, allocates sequence
numbers, persists the state and frees the spool. The sender child (`sender_process.py`) holds a
`RemotePair` with the same surface the sender uses: it reads spooled frames straight from the
segment files, never past the tail the agent publishes (`spool_tail.py`), reports
acknowledgements one way, and calls the agent for every state change (a refetch, a whole-disk
resync, a dirty-block sync, the end of a sync, a spool repair). The state it reads (the pending
sync, dirty mode, lost frames, revoked certificates) is fetched at each session start and again
whenever the agent bumps the tail's state generation.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path

from siterecovery.dataplane.assignments import DiskReplication
from siterecovery.dataplane.blocks import COARSE
from siterecovery.dataplane.dirty import DirtyBitmap
from siterecovery.dataplane.fileio import pread_full
from siterecovery.dataplane.protocol import HEADER_SIZE, Header, ProtocolError, parse_header
from siterecovery.dataplane.replica import SyncKind, SyncPlan
from siterecovery.dataplane.sender_link import Acked, Call, Op, PairView, Reply
from siterecovery.dataplane.spool_tail import SpoolTail
from siterecovery.dataplane.trust import Revocations

_SUFFIX = ".seg"

# Sends a message to the agent; `Call` returns its `Reply`, the others None.
Channel = Callable[[object], Reply | None]


class TailLog:
    """The read side of a spool in another process: `cursor` and `last_seq` as `SegmentLog`'s."""

    def __init__(self, directory: Path, tail: SpoolTail) -> None:
        self.directory = directory
        self.tail = tail

    @property
    def last_seq(self) -> int:
        return self.tail.read().last_seq

    def cursor(self, after_seq: int) -> TailCursor:
        return TailCursor(self, after_seq)

    def segments(self, upto: int) -> list[int]:
        """First sequences of the segment files published so far (not newer than `upto`)."""
        firsts = []
        for name in os.listdir(self.directory):
            if name.endswith(_SUFFIX) and name[: -len(_SUFFIX)].isdigit():
                first = int(name[: -len(_SUFFIX)])
                if first <= upto:
                    firsts.append(first)
        return sorted(firsts)

    def path(self, first: int) -> Path:
        return self.directory / f"{first:020d}{_SUFFIX}"


class TailCursor:
    """Reads frames after a sequence into a reused buffer; None when caught up with the tail.

    Segments before the published one are whole (the agent rolls only after a complete frame);
    in the published one only `segment_bytes` are read. A segment freed meanwhile (acknowledged)
    is skipped by listing the directory again.
    """

    def __init__(self, log: TailLog, after_seq: int) -> None:
        self._log = log
        self._after = after_seq
        self._first = -1  # the segment being read (-1: none chosen yet)
        self._pos = 0
        self._fd: int | None = None

    def _choose(self, upto: int) -> bool:
        """Open the segment to read next; False if there is none yet."""
        firsts = self._log.segments(upto)
        if self._first < 0:
            # The last segment that can hold frames after `_after` (named by their first sequence).
            earlier = [f for f in firsts if f <= self._after + 1]
            candidates = earlier[-1:] + [f for f in firsts if f > self._after + 1]
        else:
            candidates = [f for f in firsts if f > self._first]
        for first in candidates:
            try:
                fd = os.open(self._log.path(first), os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                continue  # freed under us
            self.close()
            self._fd, self._first, self._pos = fd, first, 0
            return True
        return False

    def next(self, buf: bytearray) -> tuple[Header, memoryview] | None:
        view = memoryview(buf)
        while True:
            tail = self._log.tail.read()
            if tail.segment_first < 0:
                return None
            if self._fd is None and not self._choose(tail.segment_first):
                return None
            assert self._fd is not None
            end = tail.segment_bytes if self._first == tail.segment_first else os.fstat(self._fd).st_size
            if self._pos >= end:
                if self._first == tail.segment_first or not self._choose(tail.segment_first):
                    return None
                continue
            if end - self._pos < HEADER_SIZE:
                raise ProtocolError(f"segment {self._first} ends inside a frame header at {self._pos}")
            _read_exact(self._fd, view[:HEADER_SIZE], self._pos)
            header = parse_header(view[:HEADER_SIZE])
            total = HEADER_SIZE + header.payload_len
            _read_exact(self._fd, view[HEADER_SIZE:total], self._pos + HEADER_SIZE)
            self._pos += total
            if header.seq > self._after:
                self._after = header.seq
                return header, view[:total]

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _read_exact(fd: int, view: memoryview, offset: int) -> None:
    if pread_full(fd, view, offset) < len(view):
        raise ProtocolError(f"spool segment ended early at {offset}")


class RemotePair:
    """The pair's surface for `PairSender`, in the sender child (see the module docstring)."""

    def __init__(
        self,
        spec: DiskReplication,
        image: Path,
        pair_dir: Path,
        size: int,
        channel: Channel,
        bytes_sent: int = 0,
    ) -> None:
        self.spec = spec
        self.pair_id = spec.pair_id
        self.image = image
        self.dir = pair_dir
        self.size = size
        self._channel = channel
        self.tail = SpoolTail(pair_dir / "spool.tail")
        self.spool = TailLog(pair_dir / "spool", self.tail)
        self.changed = threading.Condition()
        self.revoked = Revocations()
        self.acked = -1
        self.bytes_sent = bytes_sent
        self.bytes_done = 0
        self.bytes_total = 0
        self._sync: SyncPlan | None = None
        self.dirty_mode = False
        self.lost: list[int] = []
        self._seen = -1  # the state generation last fetched

    # --- state read from the agent ------------------------------------------------------------

    def _refresh_if_changed(self) -> None:
        generation = self.tail.state_generation
        if generation != self._seen:
            self._seen = generation
            self._call(Op.STATE)

    def refresh(self) -> None:
        """Fetch the state (a session starts: revocations, lost frames, the sync)."""
        self._seen = self.tail.state_generation
        self._call(Op.STATE)

    def export_saturated(self, now: float) -> bool:
        """The agent's export is saturated at `now` (`time.monotonic()`): see `spool_tail.py`."""
        return now < self.tail.saturated_until

    @property
    def sync(self) -> SyncPlan | None:
        self._refresh_if_changed()
        return self._sync

    def _call(self, op: Op, *args: int) -> int | None:
        reply = self._channel(Call(op, args))
        assert reply is not None
        view: PairView = reply.view
        plan = None if view.sync is None else SyncPlan(*view.sync)
        # The same plan keeps its identity: the sender sends a sync once per session.
        if plan != self._sync:
            self._sync = plan
        self.dirty_mode = view.dirty_mode
        self.lost = list(view.lost)
        self.revoked.update(view.revoked)
        return reply.result

    # --- what the sender does to the pair -----------------------------------------------------

    def on_ack(self, seq: int) -> None:
        if seq > self.acked:
            self.acked = seq
            self._channel(Acked(seq, self.bytes_sent, self.bytes_done, self.bytes_total))
        with self.changed:
            self.changed.notify_all()

    def refetch(self, offset: int, length: int) -> int:
        seq = self._call(Op.REFETCH, offset, length)
        assert seq is not None
        return seq

    def resync_whole(self) -> None:
        self._call(Op.RESYNC_WHOLE)

    def repair_spool(self) -> None:
        self._call(Op.REPAIR_SPOOL)

    def start_sync(self, kind: SyncKind) -> None:
        if kind != SyncKind.DIRTY:
            raise ValueError(f"a sender starts only dirty-block syncs, not {kind}")
        self._call(Op.START_DIRTY)

    def sync_generated(self, last_seq: int | None) -> None:
        self._call(Op.SYNC_GENERATED, -1 if last_seq is None else last_seq)

    def intent_bitmap(self) -> DirtyBitmap:
        return DirtyBitmap(self.dir / "intent-sync.bitmap", self.size, COARSE)

    def sync_bitmap(self) -> DirtyBitmap:
        return DirtyBitmap(self.dir / "sync.bitmap", self.size)
