"""One replicated disk on the agent: the `CaptureSink` that spools writes, and the pair's state.

Every captured write gets the pair's next sequence number and is appended to the spool (segment
files on the agent's disk; `flush()` fsyncs them). Sequence numbers survive restarts: they are
reserved in blocks recorded in `state.json` before use. When the spool outgrows its limit the pair
switches to dirty-block tracking and is *resync-required*. A sync (full copy, delta, or dirty
blocks) reserves a window of sequence numbers at once, one per 4 KiB of disk, so the sync's
frames sit in the stream after everything captured before it and before everything captured
during it; the master target's idempotence by sequence then yields the disk's current content.

Frames of unknown ranges lost downstream or in the spool (a damaged frame header, `segment_log.py`)
are repaired by comparing the whole disk with the target (an INTENT sync of every block); once that
sync is acknowledged a header-only REFETCH|RESYNC write tells every hop the loss is healed.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from siterecovery.dataplane.assignments import DiskReplication, PairState, PairStats, SyncMode
from siterecovery.dataplane.blocks import COARSE, FINE
from siterecovery.dataplane.dirty import DirtyBitmap
from siterecovery.dataplane.fileio import write_durably
from siterecovery.dataplane.protocol import (
    EMPTY_DIGEST,
    HEADER_SIZE,
    Bookmark,
    BookmarkKind,
    Flag,
    FrameType,
    digest,
    pack_header,
)
from siterecovery.dataplane.segment_log import SegmentLog
from siterecovery.dataplane.spool_tail import SpoolTail

log = logging.getLogger(__name__)

_RESERVE = 1 << 20
DEFAULT_SPOOL_LIMIT = 1 << 30
# The export counts as saturated once its thread spent at least this share of the wall time on
# requests in two windows in a row (`nbd.image.BusyMeter`, 0.1 s each); it counts so until
# SATURATED_HOLD s after the last such window, so the sender does not wake for a brief dip.
SATURATED = 0.7
SATURATED_HOLD = 0.3


class WholeResync(StrEnum):
    """A whole-disk comparison asked for after a loss of unknown ranges (persisted)."""

    REQUESTED = "requested"  # to run as the next INTENT sync
    RUNNING = "running"  # the current INTENT sync; its end is announced with a marker


class SyncKind(StrEnum):
    FULL = "full"
    DELTA = "delta"
    DIRTY = "dirty"
    INTENT = "intent"  # delta of the extents an unclean stop left in the write-intent log


# Syncs of some blocks only: the pair is resync-required, not in its initial sync.
_PARTIAL = (SyncKind.DIRTY, SyncKind.INTENT)


@dataclass(frozen=True)
class SyncPlan:
    kind: SyncKind
    s0: int  # frames of this sync carry s0 + 1 + offset // FINE

    def seq_for(self, offset: int) -> int:
        return self.s0 + 1 + offset // FINE

    def resume_offset(self, acked: int, align: int) -> int:
        """Where a restarted sync resumes: the aligned start of the last acknowledged frame."""
        if acked <= self.s0:
            return 0
        return ((acked - self.s0 - 1) * FINE) // align * align


class PairReplication:
    """CaptureSink for one disk plus its persisted replication state. Thread-safe."""

    def __init__(
        self, spec: DiskReplication, image: Path, state_dir: Path, spool_limit: int = DEFAULT_SPOOL_LIMIT
    ) -> None:
        self.spec = spec
        self.pair_id = spec.pair_id
        self.image = image
        self.size = os.stat(image).st_size
        self.dir = state_dir / "pairs" / spec.pair_id
        self.dir.mkdir(parents=True, exist_ok=True)
        # Large frames skip the page cache: a burst the spool absorbs is then held to the disk's
        # speed, not to the kernel's dirty-page throttling (`SegmentLog._put`).
        self.spool = SegmentLog(self.dir / "spool", direct=True)
        # Read by the sender child (`sender_process.py`): where the spool ends, state changes.
        self.tail = SpoolTail(self.dir / "spool.tail")
        self.spool.share_tail(self.tail)
        self.spool_limit = spool_limit
        self.dirty = DirtyBitmap(self.dir / "dirty.bitmap", self.size)
        # Coarse blocks to compare with the target once no other sync is pending (INTENT).
        self.intent = DirtyBitmap(self.dir / "intent.bitmap", self.size, COARSE)
        self._lock = threading.Lock()
        self._hbuf = bytearray(HEADER_SIZE)
        self._deferred: list[tuple[int, int]] = []  # ranges of frames deferred since the last settle
        self._flying: list[tuple[int, int]] = []  # ... and of the batch that settle left in flight
        self._saturated_until = 0.0  # the export counts as saturated until then (`export_load`)
        self._busy_windows = 0  # windows in a row with the export's busy share >= SATURATED
        self._state_path = self.dir / "state.json"
        self.sync: SyncPlan | None = None
        self.sync_last: int | None = None
        self.dirty_mode = False
        self.whole: WholeResync | None = None
        # Sequences at which the spool lost frames (damaged header): sent as MISSING|RESYNC frames.
        self.lost: list[int] = []
        generation = 0
        reserved = 0
        if self._state_path.exists():
            saved = json.loads(self._state_path.read_text())
            generation = int(saved["generation"])
            reserved = int(saved["seq_reserved"])
            self.dirty_mode = bool(saved["dirty_mode"])
            if saved["sync"] is not None:
                self.sync = SyncPlan(SyncKind(saved["sync"]["kind"]), int(saved["sync"]["s0"]))
            if saved.get("whole"):
                self.whole = WholeResync(saved["whole"])
            self.lost = [int(s) for s in saved.get("lost", [])]
        self._note_damage()
        self._next = max(reserved, self.spool.last_seq + 1)
        self.tail.publish_captured(self._next - 1)
        self._reserved = self._next
        # The last number a frame carries (a write, bookmark or marker; a done sync's last frame).
        # A sync reserves one number per block up front and a restart skips to the reserved mark:
        # those never carried by a frame are not captured writes (`reported_seq`).
        self._last_frame = self.spool.last_seq
        self._generation = generation
        # A new generation starts with a sync of the whole disk: it covers every earlier write.
        self.fresh = spec.generation > generation
        self.acked = -1
        self.bytes_sent = 0
        self.bytes_done = 0
        self.bytes_total = 0
        self.last_write_time: float | None = None
        self.changed = threading.Condition()
        if spec.generation > generation:
            self._generation = spec.generation
            self.start_sync(SyncKind.FULL if spec.sync_mode == SyncMode.FULL else SyncKind.DELTA)
        elif self.sync is None and self.intent.any():
            self.start_sync(SyncKind.INTENT)  # requested, then a crash before it was planned
        else:
            self._save_state()
        self.spool.clear_damage()  # taken over by the state saved above

    # --- sequence numbers and state -----------------------------------------------------------

    def _alloc(self, count: int = 1, *, frames: bool = True) -> int:
        seq = self._next
        self._next += count
        if frames:
            self._last_frame = self._next - 1
        self.tail.publish_captured(self._next - 1)  # for watchers (a bench), without a stats round
        if self._next > self._reserved:
            self._reserved = self._next + _RESERVE
            self._save_state()
        return seq

    def _save_state(self) -> None:
        state = {
            "generation": self._generation,
            "seq_reserved": self._reserved,
            "dirty_mode": self.dirty_mode,
            "sync": None if self.sync is None else {"kind": self.sync.kind.value, "s0": self.sync.s0},
            "whole": None if self.whole is None else self.whole.value,
            "lost": self.lost,
        }
        write_durably(self._state_path, json.dumps(state).encode())
        self.tail.state_changed()

    @property
    def captured_seq(self) -> int:
        return self._next - 1

    @property
    def reported_seq(self) -> int:
        """What the pair reports as captured: with no sync pending, the last number a frame carries.

        The drain of a planned failover, the RPO monitor and the stall alert compare it with what
        was acknowledged and applied; the unused rest of a done sync's window (an idle disk after
        a resync) would stay "captured, never acknowledged" for ever (`drain-incomplete`)."""
        return self._next - 1 if self.sync is not None else self._last_frame

    # --- CaptureSink ----------------------------------------------------------------------------

    def record_write(self, offset: int, data: memoryview) -> int:
        with self._lock:
            seq = self._alloc()
            self.last_write_time = time.time()
            if self.dirty_mode:
                self.dirty.mark(offset, len(data))
            else:
                pack_header(
                    self._hbuf, FrameType.WRITE, Flag.NONE, 0, seq, offset, len(data), len(data), digest(data)
                )
                self._append(seq, data, defer=True)
                self._deferred.append((offset, len(data)))
        return seq

    def record_writes(self, writes: Sequence[tuple[int, memoryview]]) -> None:
        """`record_write` for each `(offset, data)` of one export batch, under one lock; the spool's
        limit is checked once per batch (it may be passed by one batch)."""
        with self._lock:
            seq = self._alloc(len(writes))
            self.last_write_time = time.time()
            if self.dirty_mode:
                for offset, data in writes:
                    self.dirty.mark(offset, len(data))
                return
            frames: list[tuple[int, bytearray, memoryview]] = []
            for offset, data in writes:
                n = len(data)
                header = bytearray(HEADER_SIZE)
                pack_header(header, FrameType.WRITE, Flag.NONE, 0, seq, offset, n, n, digest(data))
                frames.append((seq, header, data))
                seq += 1
            self.spool.defer_many(frames)
            self._deferred.extend((offset, len(data)) for offset, data in writes)
            self._check_limit()

    def record_zero(self, offset: int, length: int) -> int:
        with self._lock:
            seq = self._alloc()
            self.last_write_time = time.time()
            if self.dirty_mode:
                self.dirty.mark(offset, length)
            else:
                pack_header(self._hbuf, FrameType.WRITE, Flag.ZERO, 0, seq, offset, length, 0, EMPTY_DIGEST)
                self._append(seq, b"", defer=True)
                self._deferred.append((offset, length))
        return seq

    def settle(self) -> None:
        """The export has handed over every request it had read: write the deferred frames out in
        one go (a large batch in the background, while the export goes on: `SegmentLog.settle`).
        If that fails (a full spool volume), their ranges go to the dirty bitmap instead, as when
        the spool is over its limit: the writes are resynced, never lost."""
        with self._lock:
            self._settle(wait=False)

    def _settle(self, *, wait: bool = True) -> None:
        ranges, self._deferred = self._deferred, []
        try:
            flying = self.spool.settle(wait=wait)
        except OSError as exc:
            # The batch that failed may be the one the previous settle left in flight.
            ranges, self._flying = self._flying + ranges, []
            log.error(
                "pair %s: spool write failed (%s); tracking %d writes as dirty",
                self.pair_id,
                exc,
                len(ranges),
            )
            for offset, length in ranges:
                self.dirty.mark(offset, length)
            self.spool.discard_deferred()
            self.dirty_mode = True
            self._save_state()
            return
        self._flying = ranges if flying else []

    def export_load(self, busy: float, now: float) -> None:
        """The export's busy share of its last window: while it is saturated, tell the sender (through
        the spool's tail) to hold back, so the spool absorbs the burst and the CPU stays with the
        export (`sender.py`). No lock: the tail's load field is written by this thread only."""
        # Two busy windows in a row: one alone is a client's short burst (fio held to a rate sends
        # its queue at once), not a saturated export.
        self._busy_windows = self._busy_windows + 1 if busy >= SATURATED else 0
        if self._busy_windows >= 2:
            self._saturated_until = now + SATURATED_HOLD
        self.tail.publish_load(self._saturated_until, busy)

    def refetch(self, offset: int, length: int) -> int:
        """Re-read [offset, +length) from the image and spool it as a new write (flag REFETCH).

        Under the capture lock, and the export writes the image before it records a write: every
        write already recorded is in what is read, and any later one gets a later sequence.
        """
        length = max(0, min(length, self.size - offset))
        fd = os.open(self.image, os.O_RDONLY | os.O_CLOEXEC)
        try:
            with self._lock:
                data = memoryview(os.pread(fd, length, offset))
                seq = self._alloc()
                # Spooled even past the spool's limit (dirty mode): downstream waits for exactly
                # this frame, and a later dirty-block sync only brings newer content after it.
                pack_header(
                    self._hbuf, FrameType.WRITE, Flag.REFETCH, 0, seq, offset, length, length, digest(data)
                )
                self._append(seq, data)
        finally:
            os.close(fd)
        self.spool.sync()
        with self.changed:
            self.changed.notify_all()
        return seq

    def flush(self) -> None:
        with self._lock:
            self._settle()
        self.spool.sync()
        with self._lock:
            if self.dirty_mode:
                self.dirty.save()

    def absorb(self, changed: DirtyBitmap) -> None:
        """Blocks written while this pair was not capturing: track them dirty, to be resynced."""
        with self._lock:
            self.dirty.merge(changed)
            self.dirty_mode = True
            self.dirty.save()
            self._save_state()

    def bookmark(self, tag: str, kind: BookmarkKind, *, sync: bool = True) -> int:
        """Insert a recovery-point marker after every write recorded so far.

        Without `sync` the caller fsyncs the spool (after releasing the capture locks it holds).
        """
        payload = Bookmark(tag=tag, kind=kind, timestamp=time.time()).model_dump_json().encode()
        with self._lock:
            seq = self._alloc()
            if not self.dirty_mode:
                pack_header(
                    self._hbuf, FrameType.BOOKMARK, Flag.NONE, 0, seq, 0, 0, len(payload), digest(payload)
                )
                self._append(seq, payload)
        if sync:
            self.spool.sync()
        return seq

    def _append(self, seq: int, payload: memoryview | bytes, *, defer: bool = False) -> None:
        if defer:
            self.spool.defer(seq, self._hbuf, payload)
        else:
            self._settle()  # the deferred frames go first (or to the dirty bitmap)
            self.spool.append(seq, self._hbuf, payload)
        self._check_limit()

    def _check_limit(self) -> None:
        if self.spool.bytes_used > self.spool_limit:
            # Past the limit the spool stops growing: remember only which blocks changed.
            self.dirty_mode = True
            self._save_state()

    # --- syncs ----------------------------------------------------------------------------------

    def start_sync(self, kind: SyncKind) -> None:
        """Reserve a sequence window for a sync of `kind` (dirty: of the blocks tracked so far)."""
        with self._lock:
            self._start_sync(kind)

    def _start_sync(self, kind: SyncKind) -> None:
        if kind == SyncKind.DIRTY:
            self.dirty.take(self.dir / "sync.bitmap")
            self.dirty_mode = False
        elif kind == SyncKind.INTENT:
            self.intent.take(self.dir / "intent-sync.bitmap")
            if self.whole is WholeResync.REQUESTED:
                self.whole = WholeResync.RUNNING
        s0 = self._alloc(self.size // FINE + 2, frames=False)  # its frames count once done
        self.sync = SyncPlan(kind, s0)
        self.sync_last = None
        self._save_state()

    def renew(self, spec: DiskReplication) -> None:
        """The pair's desired state changed while it runs; a raised generation asks for a new
        initial sync (full or delta, per `sync_mode`) after everything captured so far."""
        with self._lock:
            self._renew(spec)

    def _renew(self, spec: DiskReplication) -> None:
        self.spec = spec
        if spec.generation > self._generation:
            self._generation = spec.generation
            self._start_sync(SyncKind.FULL if spec.sync_mode == SyncMode.FULL else SyncKind.DELTA)

    def renew_idle(self, spec: DiskReplication) -> bool:
        """`renew` if no sync is pending, at once under the lock; False (nothing done) otherwise.

        The running sender may then keep its session: it picks the new sync up from the state
        (`_save_state` bumps the tail's state generation). With a sync pending it must restart
        instead, or its report of the old sync's last frame would end the new one early.
        """
        with self._lock:
            if self.sync is not None:
                return False
            self._renew(spec)
            return True

    def request_resync(self, ranges: list[tuple[int, int]]) -> None:
        """Compare these ranges with the target and send what differs (after an unclean stop).

        Recorded durably before returning; runs as soon as no other sync is pending.
        """
        with self._lock:
            for offset, length in ranges:
                self.intent.mark(offset, min(length, self.size - offset))
            self.intent.save()
            if self.sync is None:
                self._start_sync(SyncKind.INTENT)

    def resync_whole(self) -> None:
        """A hop lost frames of unknown ranges: compare the whole disk with the target."""
        with self._lock:
            if self.whole is not None:
                return  # already asked for (a repeated request after a reconnect)
            self.whole = WholeResync.REQUESTED
            self.intent.mark(0, self.size)
            self.intent.save()
            if self.sync is None:
                self._start_sync(SyncKind.INTENT)
            else:
                self._save_state()
        with self.changed:
            self.changed.notify_all()

    def _note_damage(self) -> None:
        """Frames of unknown ranges are gone from the spool (damage): the disk still has them."""
        if self.spool.damage:
            self.lost = sorted({*self.lost, *(d.after_seq + 1 for d in self.spool.damage)})
            self.whole = self.whole or WholeResync.REQUESTED
            self.intent.mark(0, self.size)
            self.intent.save()

    def repair_spool(self) -> None:
        """The sender met a bad frame header in the spool: skip the damage and resync the disk."""
        if not self.spool.repair():
            return
        with self._lock:
            self._note_damage()
            if self.sync is None:
                self._start_sync(SyncKind.INTENT)
            else:
                self._save_state()
        self.spool.clear_damage()

    def intent_bitmap(self) -> DirtyBitmap:
        return DirtyBitmap(self.dir / "intent-sync.bitmap", self.size, COARSE)

    def sync_bitmap(self) -> DirtyBitmap:
        return DirtyBitmap(self.dir / "sync.bitmap", self.size)

    def sync_generated(self, last_seq: int | None) -> None:
        """The sync's frames are all sent; it is complete once the last one is acknowledged."""
        with self._lock:
            self.sync_last = last_seq if last_seq is not None else -1
        self._check_sync_done()

    def on_ack(self, seq: int) -> None:
        if seq > self.acked:
            self.acked = seq
            self.spool.free_through(seq)
            if self.lost and self.lost[0] <= seq:
                with self._lock:
                    self.lost = [s for s in self.lost if s > seq]
                    self._save_state()
        self._check_sync_done()
        with self.changed:
            self.changed.notify_all()

    def _check_sync_done(self) -> None:
        marked = False
        with self._lock:
            if self.sync is not None and self.sync_last is not None and self.acked >= self.sync_last:
                self._last_frame = max(self._last_frame, self.sync_last)
                if self.sync.kind == SyncKind.DIRTY:
                    (self.dir / "sync.bitmap").unlink(missing_ok=True)
                elif self.sync.kind == SyncKind.INTENT:
                    (self.dir / "intent-sync.bitmap").unlink(missing_ok=True)
                    if self.whole is WholeResync.RUNNING:
                        # After every frame of the comparison: the loss is repaired from here on.
                        seq = self._alloc()
                        flags = Flag.REFETCH | Flag.RESYNC
                        pack_header(self._hbuf, FrameType.WRITE, flags, 0, seq, 0, 0, 0, EMPTY_DIGEST)
                        self._append(seq, b"")
                        self.whole = None
                        marked = True
                self.sync = None
                self.sync_last = None
                if self.intent.any():
                    self._start_sync(SyncKind.INTENT)
                else:
                    self._save_state()
        if marked:
            self.spool.sync()
            with self.changed:
                self.changed.notify_all()

    def drained(self) -> bool:
        """Everything captured so far is acknowledged by the process server."""
        return self.sync is None and not self.dirty_mode and self.acked >= self.spool.last_seq

    def stats(self) -> PairStats:
        if self.spec.paused:
            state = PairState.PAUSED
        elif self.dirty_mode or (
            self.sync is not None and self.sync.kind in (SyncKind.DIRTY, SyncKind.INTENT)
        ):
            state = PairState.RESYNC_REQUIRED
        elif self.sync is not None:
            state = PairState.INITIAL_SYNC
        else:
            state = PairState.PROTECTED
        return PairStats(
            pair_id=self.pair_id,
            state=state,
            bytes_done=self.bytes_done,
            bytes_total=self.bytes_total,
            bytes_sent=self.bytes_sent,
            captured_seq=self.reported_seq,
            acked_seq=self.acked,
            last_write_time=self.last_write_time,
            spool_bytes=self.spool.bytes_used,
        )
