"""Flipping one byte where the product keeps data at rest: the process server's cache of frames
and the master target's retention journal.

The cache is parsed with the wire format's own header parser (the bytes at rest are frames); the
journal with the record layout docs/journal.md documents. Either way one byte is XORed, as a bad
disk sector or a bit flip in memory would.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path

from siterecovery.dataplane.protocol import HEADER_SIZE, FrameType, parse_header

# docs/journal.md: a segment starts with magic, index, base seq; a record is magic, kind, point
# kind, reserved, seq, time, offset, length, payload length, checksum, then the payload.
_SEG_HEADER = struct.Struct("<8sQq")
_RECORD = struct.Struct("<4sBBHqdQQQQ")
_DATA, _ZERO = 1, 2


@dataclass(frozen=True)
class Flipped:
    path: Path
    at: int
    seq: int


def _flip(path: Path, at: int) -> None:
    with open(path, "r+b") as f:
        f.seek(at)
        byte = f.read(1)
        f.seek(at)
        f.write(bytes([byte[0] ^ 0xFF]))
        f.flush()
        os.fsync(f.fileno())


def cached_writes(pair_cache: Path) -> list[tuple[Path, int, int, int]]:
    """(segment, payload offset, payload length, seq) of every WRITE frame in a pair's cache."""
    out: list[tuple[Path, int, int, int]] = []
    for seg in sorted(pair_cache.glob("*.seg"), key=lambda p: int(p.stem)):
        data = seg.read_bytes()
        at = 0
        while at + HEADER_SIZE <= len(data):
            h = parse_header(data[at : at + HEADER_SIZE])
            if h.type == FrameType.WRITE and h.payload_len:
                out.append((seg, at + HEADER_SIZE, h.payload_len, h.seq))
            at += HEADER_SIZE + h.payload_len
    return out


def flip_cached_write(pair_cache: Path, after_seq: int) -> Flipped | None:
    """Flip a payload byte of the newest cached WRITE frame newer than `after_seq`."""
    newer = [w for w in cached_writes(pair_cache) if w[3] > after_seq]
    if not newer:
        return None
    seg, payload_at, length, seq = newer[-1]
    _flip(seg, payload_at + length // 2)
    return Flipped(seg, payload_at + length // 2, seq)


def flip_journal_record(journal: Path, after_seq: int, before_seq: int) -> Flipped | None:
    """Flip a checksum byte of a DATA or ZERO (undo) record with after_seq < seq <= before_seq."""
    for seg in sorted(journal.glob("seg-*.jnl")):
        data = seg.read_bytes()
        at = _SEG_HEADER.size
        while at + _RECORD.size <= len(data):
            magic, kind, _pk, _r, seq, _t, _off, _len, plen, _sum = _RECORD.unpack_from(data, at)
            if magic != b"SRJR":
                break
            if kind in (_DATA, _ZERO) and after_seq < seq <= before_seq:
                _flip(seg, at + _RECORD.size - 1)
                return Flipped(seg, at + _RECORD.size - 1, seq)
            at += _RECORD.size + plen
    return None
