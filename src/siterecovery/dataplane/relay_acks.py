"""What a process server may acknowledge to an agent, and the meta file of a pair's cache.

A captured write is acknowledged once the cache is fsynced; a sync's BLOCK frame is not fsynced at
all (the agent can read it from its disk again) and is acknowledged only once the master target
acknowledged it (cut-through): an initial sync then writes each byte to one disk, not two. ACKs are
cumulative, so the ACK to the agent stops before the first frame that is neither (`AckGate`).

Frames not fsynced may be lost in a power cut in any pattern — an earlier segment's tail gone and
a later segment kept is a hole nothing in the log shows, sequence numbers of a sync being sparse.
So before the first unfsynced frame is appended, the meta records durably the frame it follows
(`volatile_after`); only an fsync covering everything appended clears it, and before anything after
it is acknowledged. A cache opened with the mark set drops every frame after it (`SegmentLog.cut_after`);
none of them had been acknowledged to the agent, which sends them again.
"""

from __future__ import annotations

import json
import os
import threading
from collections import deque
from pathlib import Path

from siterecovery.dataplane.fileio import write_durably


class AckGate:
    """Frames cached but not yet durable, and the newest sequence the agent may be told. Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._volatile: deque[int] = deque()  # sync blocks neither fsynced nor applied downstream
        self._unsynced_from = -1  # the first other frame appended since the last fsync (-1: none)
        self.told = -1  # the newest ACK sent to the agent of the session

    def cached(self, seq: int, volatile: bool) -> None:
        with self._lock:
            if volatile:
                self._volatile.append(seq)
            elif self._unsynced_from < 0:
                self._unsynced_from = seq

    @property
    def needs_fsync(self) -> bool:
        return self._unsynced_from >= 0

    def fsynced(self, last: int) -> None:
        """Every frame up to `last` is fsynced."""
        with self._lock:
            while self._volatile and self._volatile[0] <= last:
                self._volatile.popleft()
            if self._unsynced_from <= last:
                self._unsynced_from = -1

    def point(self, cached_last: int, mt_acked: int) -> int:
        """The newest sequence such that every frame up to it is fsynced here or acknowledged by
        the master target (`cached_last`: the cache's newest frame)."""
        with self._lock:
            while self._volatile and self._volatile[0] <= mt_acked:
                self._volatile.popleft()
            first = self._volatile[0] if self._volatile else None
            if self._unsynced_from >= 0:
                pending = max(self._unsynced_from, mt_acked + 1)
                first = pending if first is None else min(first, pending)
            if first is None:
                return max(cached_last, mt_acked)
            return max(mt_acked, first - 1)

    def advance(self, point: int) -> bool:
        """Whether `point` is news to the agent (then it is taken as told)."""
        with self._lock:
            if point <= self.told:
                return False
            self.told = point
            return True


class RelayMeta:
    """`meta.json` of a pair's cache: its master target, what that acknowledged, the volatile mark."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self.master_target = ""
        self.mt_acked = -1
        self.volatile_after: int | None = None
        if path.exists():
            meta = json.loads(path.read_text())
            self.master_target = str(meta["master_target"])
            self.mt_acked = int(meta["mt_acked"])
            after = meta.get("volatile_after")
            self.volatile_after = None if after is None else int(after)

    def save(self, master_target: str, mt_acked: int) -> None:
        """Not fsynced: a lost update only makes the process server resend what was applied."""
        with self._lock:
            text = self._text(master_target, mt_acked)
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(text)
            os.replace(tmp, self.path)

    def mark(self, volatile_after: int | None, master_target: str, mt_acked: int) -> None:
        """Set (a sequence) or clear (None) the volatile mark, durably."""
        with self._lock:
            self.volatile_after = volatile_after
            write_durably(self.path, self._text(master_target, mt_acked).encode())

    def _text(self, master_target: str, mt_acked: int) -> str:
        meta = {"master_target": master_target, "mt_acked": mt_acked, "volatile_after": self.volatile_after}
        return json.dumps(meta)
