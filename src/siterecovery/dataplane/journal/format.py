"""The retention journal's on-disk format: records, segment and redo headers, the position file.

docs/journal.md documents the layout. A record is a fixed header and a payload, checksummed
together so a torn or damaged record is recognised; `_Record` reads them with reused buffers.
"""

from __future__ import annotations

import errno
import os
import struct
from dataclasses import dataclass
from enum import IntEnum, StrEnum
from pathlib import Path

import xxhash

from siterecovery.dataplane.points import PointKind

# Record: magic, kind, point kind, reserved, seq, time, offset, length, payload length, checksum.
# The checksum (xxh3-64) covers the header before it and the payload, so a torn tail is detected.
_REC = struct.Struct("<4sBBHqdQQQQ")
_REC_MAGIC = b"SRJR"
_CSUM_AT = _REC.size - 8
# File header of a segment / the redo log: magic, segment index, base seq (committed at creation).
_FILE_HDR = struct.Struct("<8sQq")
_SEG_MAGIC = b"SRJSEG01"
_REDO_MAGIC = b"SRJREDO1"
# Position file: magic, state, from seq, to seq, redo mark (length of the redo log that is valid).
_POS = struct.Struct("<8sBqqQ")
_POS_MAGIC = b"SRJPOS01"


_IO = 4 << 20  # largest single read/copy; also the journal write-buffer flush threshold

_FICLONE = 0x40049409
_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
_NO_LIMIT = 1 << 62


class _Kind(IntEnum):
    DATA = 1  # payload = the bytes the write replaced (undo) or the newer bytes (redo)
    ZERO = 2  # the range read as zeroes; no payload
    POINT = 3  # payload = tag; `length` unused
    COMMIT = 4  # everything up to seq is durable on the disk


_POINT_CODE = {PointKind.CRASH: 1, PointKind.APP: 2, PointKind.GROUP: 3}
_CODE_POINT = {v: k for k, v in _POINT_CODE.items()}


class _Pos(IntEnum):
    LATEST = 0
    AT = 1
    MOVING_BACK = 2
    MOVING_FORWARD = 3


class CopyMethod(StrEnum):
    NONE = "none"  # in place, nothing copied
    REFLINK = "reflink"
    COPY_FILE_RANGE = "copy_file_range"


@dataclass(frozen=True)
class MaterialiseResult:
    """What materialising a point cost: data bytes copied or rewritten, and undo/redo records used."""

    point_id: str
    seq: int
    method: CopyMethod
    bytes_copied: int
    bytes_rewritten: int
    records: int

    @property
    def bytes_moved(self) -> int:
        return self.bytes_copied + self.bytes_rewritten


@dataclass(slots=True)
class _Segment:
    index: int
    path: Path
    base_seq: int
    size: int
    last_seq: int
    last_time: float


class _VolumeFull(Exception):
    def __init__(self, volume: str, err: OSError | None) -> None:
        super().__init__(volume)
        self.volume = volume
        self.err = err


def _commit_follows(fd: int, at: int, limit: int) -> bool:
    """A verified commit record comes after `at` (so a bad record before it is not a torn tail)."""
    probe = _Record()
    while probe.read(fd, at, limit, verify=True):
        if probe.kind == _Kind.COMMIT:
            return True
        at += probe.end_delta
    return False


def _checksum(hdr: memoryview, payload: memoryview | bytes) -> int:
    h = xxhash.xxh3_64(hdr[:_CSUM_AT])
    h.update(payload)
    return h.intdigest()


class _Record:
    """A reusable record reader: one header buffer and one growing payload buffer per journal."""

    __slots__ = ("buf", "kind", "length", "offset", "payload", "pcode", "plen", "seq", "time")

    def __init__(self) -> None:
        self.buf = bytearray(_REC.size + _IO)
        self.kind = 0
        self.pcode = 0
        self.seq = 0
        self.time = 0.0
        self.offset = 0
        self.length = 0
        self.plen = 0
        self.payload = memoryview(self.buf)[_REC.size : _REC.size]

    def read(self, fd: int, at: int, limit: int, *, verify: bool, header_only: bool = False) -> bool:
        """Parse the record at `at`; False if it is absent, torn or fails its checksum.

        With header_only (and no verify) the payload is not read and `payload` is stale.
        """
        if at + _REC.size > limit:
            return False
        view = memoryview(self.buf)
        if os.preadv(fd, [view[: _REC.size]], at) != _REC.size:
            return False
        magic, kind, pcode, _r, seq, t, offset, length, plen, csum = _REC.unpack_from(self.buf)
        if magic != _REC_MAGIC or kind not in (1, 2, 3, 4) or at + _REC.size + plen > limit:
            return False
        self.kind, self.pcode, self.seq, self.time = kind, pcode, seq, t
        self.offset, self.length, self.plen = offset, length, plen
        if header_only and not verify:
            return True
        if len(self.buf) < _REC.size + plen:
            self.buf = bytearray(_REC.size + plen)
            self.buf[: _REC.size] = view[: _REC.size]
            view = memoryview(self.buf)
        self.payload = view[_REC.size : _REC.size + plen]
        if plen and os.preadv(fd, [self.payload], at + _REC.size) != plen:
            return False
        return not verify or _checksum(view, self.payload) == csum

    @property
    def end_delta(self) -> int:
        return _REC.size + self.plen
