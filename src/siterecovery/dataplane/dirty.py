"""A persisted bitmap of dirty blocks: what the agent tracks wherever a write cannot be spooled.

When the spool may not grow any more, a write is recorded only as "this block changed" (one bit per
64 KiB). The same is done for a disk whose pair is not plugged in (not known yet, or retired), so a
pair that comes back finds what changed meanwhile. The bitmap is saved (written to a temporary file,
fsynced, renamed, directory fsynced) whenever the disk is flushed, so a crash loses no dirty bit of
a flushed write. When the link is back, the agent resyncs exactly the dirty blocks, reading their
current content from the disk.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from siterecovery.dataplane.fileio import write_durably

GRANULARITY = 64 << 10


class DirtyBitmap:
    def __init__(self, path: Path, size: int, granularity: int = GRANULARITY) -> None:
        self.path = path
        self.size = size
        self.granularity = granularity
        nbits = (size + granularity - 1) // granularity
        self._bits = bytearray((nbits + 7) // 8)
        if path.exists():
            saved = path.read_bytes()
            if len(saved) == len(self._bits):
                self._bits[:] = saved
        self._changed = False

    def mark(self, offset: int, length: int) -> None:
        first = offset // self.granularity
        last = (offset + max(length, 1) - 1) // self.granularity
        for i in range(first, last + 1):
            self._bits[i >> 3] |= 1 << (i & 7)
        self._changed = True

    def merge(self, other: DirtyBitmap) -> None:
        """Add every dirty block of `other` (same disk, same granularity)."""
        if other.granularity != self.granularity or len(other._bits) != len(self._bits):
            raise ValueError("bitmaps of different geometry")
        merged = int.from_bytes(self._bits, "little") | int.from_bytes(other._bits, "little")
        self._bits[:] = merged.to_bytes(len(self._bits), "little")
        self._changed = True

    def clear(self) -> None:
        self._bits[:] = bytes(len(self._bits))
        self._changed = True

    def any(self) -> bool:
        return any(self._bits)

    def indexes(self) -> list[int]:
        """The dirty blocks' indexes, ascending."""
        nbits = (self.size + self.granularity - 1) // self.granularity
        return [i for i in range(nbits) if self._bits[i >> 3] & (1 << (i & 7))]

    def count(self) -> int:
        return sum(bin(b).count("1") for b in self._bits)

    def runs(self) -> Iterator[tuple[int, int]]:
        """Dirty ranges (offset, length), adjacent blocks merged, clipped to the disk size."""
        start = -1
        nbits = (self.size + self.granularity - 1) // self.granularity
        for i in range(nbits + 1):
            dirty = i < nbits and self._bits[i >> 3] & (1 << (i & 7))
            if dirty and start < 0:
                start = i
            elif not dirty and start >= 0:
                off = start * self.granularity
                yield off, min(i * self.granularity, self.size) - off
                start = -1

    def save(self) -> None:
        if not self._changed and self.path.exists():
            return
        write_durably(self.path, self._bits)
        self._changed = False

    def take(self, path: Path) -> DirtyBitmap:
        """Move the current bits to a new bitmap saved at `path` and clear this one."""
        taken = DirtyBitmap(path, self.size, self.granularity)
        taken._bits[:] = self._bits
        taken._changed = True
        taken.save()
        self._bits[:] = bytes(len(self._bits))
        self._changed = True
        self.save()
        return taken

    def delete(self) -> None:
        self.path.unlink(missing_ok=True)
