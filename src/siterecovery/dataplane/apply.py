"""How the master target applies a pair's stream to its target disk: the `DiskApplier` seam.

The master target calls an applier per pair, in sequence order, skipping sequences at or below
`applied_seq` (at-least-once delivery made idempotent), and calls `sync()` before acknowledging.
`DirectApplier` writes straight to the disk (pwrite, punch-hole for zero ranges) and records the
applied sequence in a small state file after the data is fdatasync'd; the retention journal's
`JournaledDisk` implements the same protocol and is swapped in through the master target's
applier factory.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from siterecovery.dataplane.direct_write import DirectWriter
from siterecovery.dataplane.fileio import punch_or_zero, pwrite_all


class DiskApplier(Protocol):
    def apply_write(self, seq: int, offset: int, data: memoryview) -> None: ...

    def apply_zero(self, seq: int, offset: int, length: int) -> None: ...

    def bookmark(self, seq: int, tag: str, kind: str, timestamp: float) -> None: ...

    def sync(self) -> None: ...

    def close(self) -> None: ...

    @property
    def applied_seq(self) -> int: ...


# (pair_id, target disk path, size in bytes, state directory for the pair) -> applier
ApplierFactory = Callable[[str, Path, int, Path], DiskApplier]


def load_applied_seq(state: Path) -> int:
    """The sequence an applier saved in `state` (`applied.json`) as applied; -1 before the first."""
    if not state.exists():
        return -1
    return int(json.loads(state.read_text())["applied_seq"])


def save_applied_seq(state: Path, seq: int) -> None:
    """Saves `seq` as applied (after the replica's own flush): written to a temporary file, fsynced
    and renamed over `state`, so a crash leaves the old or the new value, never half of one."""
    tmp = state.with_suffix(".tmp")
    with open(tmp, "w") as f:
        json.dump({"applied_seq": seq}, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, state)


class AppliedSeq:
    """The sequence bookkeeping of an applier that writes in place (no journal): the applied
    sequence saved in `applied.json`, the one applied but not yet durable, and the bookmarks seen.
    `DirectApplier` and the page-blob applier share it so both record a sequence only after the
    replica's own flush."""

    def __init__(self, state_dir: Path) -> None:
        state_dir.mkdir(parents=True, exist_ok=True)
        self._state = state_dir / "applied.json"
        self._applied = load_applied_seq(self._state)
        self.bookmarks: list[tuple[int, str, str, float]] = []
        self._pending = self._applied

    @property
    def applied_seq(self) -> int:
        return self._applied

    def bookmark(self, seq: int, tag: str, kind: str, timestamp: float) -> None:
        self.bookmarks.append((seq, tag, kind, timestamp))
        self._pending = seq

    def _commit(self, flush: Callable[[], None]) -> None:
        """Records the pending sequence as applied after `flush` made the replica durable; neither
        when nothing is pending."""
        if self._pending == self._applied:
            return
        flush()
        save_applied_seq(self._state, self._pending)
        self._applied = self._pending


class DirectApplier(AppliedSeq):
    """Applies writes in place; the newest state only (no journal, no older recovery points)."""

    def __init__(self, pair_id: str, path: Path, size: int, state_dir: Path) -> None:
        super().__init__(state_dir)
        self.pair_id = pair_id
        self.path = path
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        if os.fstat(self._fd).st_size < size:
            os.ftruncate(self._fd, size)
        self._direct = DirectWriter(path)  # long aligned writes skip the page cache

    def apply_write(self, seq: int, offset: int, data: memoryview) -> None:
        if not (self._direct.fits(offset, len(data)) and self._direct.write([data], offset)):
            pwrite_all(self._fd, data, offset)
        self._pending = seq

    def apply_zero(self, seq: int, offset: int, length: int) -> None:
        punch_or_zero(self._fd, offset, length)
        self._pending = seq

    def sync(self) -> None:
        self._commit(lambda: os.fdatasync(self._fd))

    def close(self) -> None:
        self._direct.close()
        os.close(self._fd)


def direct_applier(pair_id: str, path: Path, size: int, state_dir: Path) -> DiskApplier:
    return DirectApplier(pair_id, path, size, state_dir)
