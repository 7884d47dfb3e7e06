"""Healing frames refused for their checksum: no hop resends a bad frame for ever, nothing is lost.

A frame can be refused at three hops: the agent -> process server link (the process server NACKs;
the agent still spools the frame and resends it), the process server's cache (the copy it stored
is damaged: resending it is pointless), and the process server -> master target link (the master
target NACKs an intact cached copy, damaged in memory on the way - TLS itself drops a session whose
records were altered in transit; resending heals it). `RefusalLog` is the process server's side,
one per pair: on a master target's NACK it verifies its cached copy; a damaged copy (or an intact
one refused `MAX_REFUSALS` times) is *dropped*: the process server forwards a header-only MISSING
frame in its place and asks the agent (REFETCH) to read that range from its disk again and send it
as a new write. The log reports every refusal in the process server's statistics, with the hop,
until it healed (the re-read write, or the resent frame, is acknowledged by the master target); the
configuration server raises a critical alert for each (`dr/heal.py`).

`Gaps` is the master target's side, one per pair: between a MISSING frame and the re-read write of
its range the disk lacks that write, so every point taken meanwhile is not crash-consistent and is
listed as unusable; the drain of a planned failover waits until no gap is open.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from pathlib import Path

from pydantic import TypeAdapter

from siterecovery.dataplane.assignments import PointInfo, RefusedFrame, RefusedHop
from siterecovery.dataplane.protocol import HEADER_SIZE, Flag, Header, frame_intact, parse_header

log = logging.getLogger(__name__)

MAX_REFUSALS = 3  # an intact cached frame refused this often is treated as damaged anyway
KEEP_HEALED = 20  # healed refusals still reported per pair (the alert history is in the database)
_ENTRIES = TypeAdapter(list[RefusedFrame])


def _save_json(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class RefusalLog:
    """A pair's refused frames at the process server, persisted in `refused.json`. Thread-safe."""

    def __init__(self, pair_id: str, directory: Path) -> None:
        self.pair_id = pair_id
        self._path = directory / "refused.json"
        self._lock = threading.Lock()
        self._refusals: dict[int, int] = {}
        self._entries: dict[int, RefusedFrame] = {}
        if self._path.exists():
            self._entries = {e.seq: e for e in _ENTRIES.validate_json(self._path.read_bytes())}

    def _save(self) -> None:
        _save_json(self._path, _ENTRIES.dump_json(list(self._entries.values())))

    def entries(self) -> list[RefusedFrame]:
        with self._lock:
            return list(self._entries.values())

    def agent_link(self, seq: int) -> None:
        """The process server refused a frame from the agent (which resends it from its spool)."""
        with self._lock:
            if seq not in self._entries:
                self._entries[seq] = RefusedFrame(
                    pair_id=self.pair_id, seq=seq, hop=RefusedHop.AGENT_LINK, refused_at=time.time()
                )
                self._save()

    def refused_downstream(self, seq: int, cached: memoryview | None) -> bool:
        """The master target NACKed `seq`; `cached` is the stored frame. True: ask for a refetch."""
        if cached is None:
            return False  # no longer cached: already acknowledged, nothing to heal
        header = parse_header(cached[:HEADER_SIZE])
        intact = frame_intact(cached)
        with self._lock:
            count = self._refusals[seq] = self._refusals.get(seq, 0) + 1
            entry = self._entries.get(seq)
            if entry is not None and entry.dropped:
                return entry.length > 0 and entry.refetch_seq < 0
            hop = RefusedHop.MT_LINK if intact else RefusedHop.CACHE
            dropped = not intact or count >= MAX_REFUSALS
            self._entries[seq] = RefusedFrame(
                pair_id=self.pair_id,
                seq=seq,
                offset=header.offset,
                length=header.length,
                hop=hop,
                refused_at=entry.refused_at if entry else time.time(),
                dropped=dropped,
            )
            self._save()
        log.warning(
            "frame %d of %s [%d, +%d) refused at hop %s%s",
            seq,
            self.pair_id,
            header.offset,
            header.length,
            hop.value,
            "; dropped, re-reading the range from the source" if dropped else "; resending",
        )
        return dropped and header.length > 0

    def lost_frames(self, seq: int, hop: RefusedHop) -> None:
        """Frames after `seq - 1` were lost to a damaged header at `hop`: the whole pair resyncs."""
        with self._lock:
            if seq in self._entries and self._entries[seq].resync:
                return
            self._entries[seq] = RefusedFrame(
                pair_id=self.pair_id, seq=seq, hop=hop, refused_at=time.time(), dropped=True, resync=True
            )
            self._save()
        log.error("frames of %s after %d lost at hop %s; resyncing the pair", self.pair_id, seq - 1, hop)

    def pending_resync(self) -> list[RefusedFrame]:
        """Losses whose whole-pair resync the agent has not reported done yet."""
        with self._lock:
            return [e for e in self._entries.values() if e.resync and e.refetch_seq < 0]

    def dropped(self, seq: int) -> bool:
        """Whether the cached frame `seq` is damaged and goes downstream as a MISSING frame (a
        loss's own MISSING|RESYNC frame, cached from the agent, goes as it is)."""
        entry = self._entries.get(seq)
        return entry is not None and entry.dropped and not entry.resync

    def pending_refetch(self) -> list[RefusedFrame]:
        with self._lock:
            return [e for e in self._entries.values() if e.dropped and e.length > 0 and e.refetch_seq < 0]

    def received(self, h: Header) -> None:
        """A data frame from the agent was cached: a re-read range, or a resend after a bad link."""
        if h.flags & Flag.MISSING and h.flags & Flag.RESYNC:
            self.lost_frames(h.seq, RefusedHop.AGENT_SPOOL)  # the agent's spool lost frames
            return
        if not self._entries:
            return
        with self._lock:
            changed = False
            for seq, e in list(self._entries.items()):
                if e.healed:
                    continue
                if e.resync:
                    if h.flags & Flag.REFETCH and h.flags & Flag.RESYNC and e.refetch_seq < 0:
                        self._entries[seq] = e.model_copy(update={"refetch_seq": h.seq})
                        changed = True
                elif e.hop is RefusedHop.AGENT_LINK:
                    self._entries[seq] = e.model_copy(update={"healed": True})
                    changed = True
                elif (
                    h.flags & Flag.REFETCH
                    and e.dropped
                    and e.refetch_seq < 0
                    and (e.offset, e.length) == (h.offset, h.length)
                ):
                    self._entries[seq] = e.model_copy(update={"refetch_seq": h.seq})
                    changed = True
            if changed:
                self._save()

    def acked(self, mt_acked: int) -> None:
        """The master target acknowledged up to `mt_acked`: refusals it covers are healed."""
        if not self._entries:
            return
        with self._lock:
            changed = False
            for seq, e in list(self._entries.items()):
                if e.healed or e.hop is RefusedHop.AGENT_LINK:
                    continue
                need = e.refetch_seq if e.dropped and (e.length > 0 or e.resync) else e.seq
                if need >= 0 and mt_acked >= need:
                    self._entries[seq] = e.model_copy(update={"healed": True})
                    self._refusals.pop(seq, None)
                    changed = True
            healed = [s for s, e in self._entries.items() if e.healed]
            for seq in healed[: max(0, len(healed) - KEEP_HEALED)]:
                del self._entries[seq]
                changed = True
            if changed:
                self._save()


class Gaps:
    """A pair's missing writes at the master target and the points taken while one was missing.

    Persisted in `gaps.json` in the pair's state directory (None: in memory only).
    """

    def __init__(self, directory: Path | None) -> None:
        self._path = directory / "gaps.json" if directory is not None else None
        self.missing: dict[int, tuple[int, int]] = {}
        self.unusable: dict[int, str] = {}
        if self._path is not None and self._path.exists():
            raw = json.loads(self._path.read_text())
            self.missing = {int(k): (int(v[0]), int(v[1])) for k, v in raw["missing"].items()}
            self.unusable = {int(k): str(v) for k, v in raw["unusable"].items()}

    def _save(self) -> None:
        if self._path is not None:
            self._path.parent.mkdir(parents=True, exist_ok=True)
            raw = {"missing": self.missing, "unusable": self.unusable}
            _save_json(self._path, json.dumps(raw).encode())

    def open(self, seq: int, offset: int, length: int, whole: bool = False) -> None:
        """A MISSING frame: the write at `seq` of [offset, +length) is not on the disk yet (`whole`:
        writes of unknown ranges, recorded as (0, 0), until the REFETCH|RESYNC marker)."""
        if (length > 0 or whole) and self.missing.get(seq) != (offset, length):
            self.missing[seq] = (offset, length)
            self._save()

    def refetched(self, offset: int, length: int) -> None:
        """A re-read write of a range was applied: the gaps of exactly that range close."""
        closed = [s for s, rng in self.missing.items() if rng == (offset, length)]
        for seq in closed:
            del self.missing[seq]
        if closed:
            self._save()

    def point(self, seq: int) -> None:
        """A point was taken at `seq`: unusable if a write before it is still missing."""
        if self.missing and seq not in self.unusable:
            first = min(self.missing)
            self.unusable[seq] = (
                f"misses the write refused at sequence {first} (re-read from the source later)"
            )
            self._save()

    def mark(self, points: list[PointInfo]) -> list[PointInfo]:
        if not self.unusable:
            return points
        return [
            p.model_copy(update={"unusable": self.unusable[p.seq]})
            if p.seq in self.unusable and p.kind != "latest"
            else p
            for p in points
        ]
