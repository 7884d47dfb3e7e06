"""The replication wire protocol, version 1 (documented in docs/protocol.md).

Agent → process server → master target speak the same framed binary protocol over mutual TLS. A
frame is a fixed 64-byte header followed by `payload_len` payload bytes. The header names the pair
(an index into the pair list sent in HELLO), the per-pair sequence number, the disk range, the
payload's xxh3-128 digest (over the uncompressed payload) and a CRC-32 of the header itself, so a
flipped bit anywhere in a frame is detected before the frame can reach a disk. Hot-path reading
uses one reused buffer per connection and `recv_into`; only compressed payloads allocate (on
decompression). Control payloads (HELLO, ERROR, BOOKMARK, RESYNC_REQUEST) are small JSON documents
validated by pydantic models.
"""

from __future__ import annotations

import json
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum, IntFlag
from typing import Protocol, TypeVar

import xxhash
import zstandard
from pydantic import BaseModel, ConfigDict

from siterecovery.errors import Problem

MAGIC = b"SRDP"
VERSION = 1
# magic, version, type, flags, pair index, seq, offset, length, payload_len, digest, reserved, hcrc
_HEADER = struct.Struct("!4sBBHIQQQI16sII")
HEADER_SIZE = _HEADER.size
_CRC_SPAN = HEADER_SIZE - 4
# Largest payload a receiver accepts; bounds the per-connection buffer (and in-flight memory).
MAX_PAYLOAD = 8 << 20
# Compression is kept only when it saves at least this fraction: decompressing costs the
# receiver more than sending a few extra bytes over loopback or a LAN.
_COMPRESS_KEEP_RATIO = 0.85
_COMPRESS_MIN = 4096
_COMPRESS_SAMPLE = 16384


class FrameType(IntEnum):
    HELLO = 1
    WRITE = 2
    BLOCK = 3
    BOOKMARK = 4
    ACK = 5
    NACK = 6
    RESYNC_REQUEST = 7
    DIGESTS = 8
    HEARTBEAT = 9
    ERROR = 10
    # Process server -> agent: a frame of [offset, offset+length) was refused for its checksum and
    # dropped; read that range from the disk again and send it as a new write (seq: the refused one).
    REFETCH = 11


class Flag(IntFlag):
    NONE = 0
    COMPRESSED = 1
    # The range [offset, offset+length) reads as zeroes; the frame has no payload.
    ZERO = 2
    # In place of a frame refused for its checksum (no payload): the write at this sequence is
    # missing until a REFETCH write of the same range arrives; points in between are unusable.
    MISSING = 4
    # A write re-read from the source disk for a refused frame's range (see FrameType.REFETCH).
    REFETCH = 8
    # The whole pair rather than one range (a damaged frame header in a segment log lost frames
    # of unknown ranges): on REFETCH, compare the whole disk with the target (delta resync); on a
    # MISSING frame, every point is unusable until the header-only REFETCH|RESYNC write that the
    # agent sends once that resync is acknowledged.
    RESYNC = 16


class ProtocolError(ConnectionError):
    """The peer sent something that is not a valid frame; the connection must be dropped."""


class CorruptFrame(ProtocolError):
    """A frame whose header CRC or payload digest does not match: refused, the sender resends."""

    def __init__(self, pair: int, seq: int, reason: str) -> None:
        super().__init__(f"corrupt frame (pair index {pair}, seq {seq}): {reason}")
        self.pair = pair
        self.seq = seq


class TruncatedFrame(ProtocolError):
    """The stream ended in the middle of a frame."""


@dataclass(slots=True)
class Header:
    type: FrameType
    flags: Flag
    pair: int
    seq: int
    offset: int
    length: int
    payload_len: int
    digest: bytes


@dataclass(slots=True)
class Frame:
    """A received frame. `payload` is the uncompressed payload; `wire` the bytes as received.

    Both are views into the reader's reused buffers and are valid only until the next read — unless
    the reader was given a `place` for it: then `buffer` is the caller's own buffer, `wire` a view
    of it after HEADER_SIZE bytes left for a header (see `FrameReader.read`).
    """

    header: Header
    payload: memoryview
    wire: memoryview
    buffer: bytearray | None = None


EMPTY_DIGEST = xxhash.xxh3_128_digest(b"")


def pack_header(
    buf: bytearray,
    ftype: FrameType,
    flags: Flag,
    pair: int,
    seq: int,
    offset: int,
    length: int,
    payload_len: int,
    digest: bytes,
) -> None:
    """Write a header into the first HEADER_SIZE bytes of `buf` (reused by the caller)."""
    _HEADER.pack_into(
        buf, 0, MAGIC, VERSION, ftype, flags, pair, seq, offset, length, payload_len, digest, 0, 0
    )
    struct.pack_into("!I", buf, _CRC_SPAN, zlib.crc32(memoryview(buf)[:_CRC_SPAN]))


def parse_header(buf: memoryview | bytes | bytearray) -> Header:
    """Decode and validate a header; raise ProtocolError/CorruptFrame if it is not one."""
    magic, version, ftype, flags, pair, seq, offset, length, plen, digest, _reserved, hcrc = (
        _HEADER.unpack_from(buf, 0)
    )
    if magic != MAGIC:
        raise ProtocolError(f"bad magic {magic!r}: not a siterecovery replication stream")
    if zlib.crc32(memoryview(buf)[:_CRC_SPAN]) != hcrc:
        raise CorruptFrame(pair, seq, "header CRC mismatch")
    if version != VERSION:
        raise ProtocolError(f"protocol version {version} not supported (this end speaks {VERSION})")
    if plen > MAX_PAYLOAD:
        raise ProtocolError(f"payload of {plen} bytes exceeds the {MAX_PAYLOAD}-byte limit")
    try:
        return Header(FrameType(ftype), Flag(flags), pair, seq, offset, length, plen, digest)
    except ValueError as exc:
        raise ProtocolError(str(exc)) from exc


def digest(data: memoryview | bytes | bytearray) -> bytes:
    return xxhash.xxh3_128_digest(data)


class Compressor:
    """Per-sender zstd context: compresses a payload only when it pays."""

    def __init__(self, level: int = 1) -> None:
        self._cctx = zstandard.ZstdCompressor(level=level)

    def maybe_compress(self, data: memoryview) -> tuple[Flag, memoryview | bytes]:
        n = len(data)
        if n < _COMPRESS_MIN:
            return Flag.NONE, data
        # Probe a sample first so incompressible (random, encrypted) data costs one small call.
        if n > 2 * _COMPRESS_SAMPLE:
            sample = self._cctx.compress(data[:_COMPRESS_SAMPLE])
            if len(sample) > _COMPRESS_SAMPLE * _COMPRESS_KEEP_RATIO:
                return Flag.NONE, data
        out = self._cctx.compress(data)
        if len(out) > n * _COMPRESS_KEEP_RATIO:
            return Flag.NONE, data
        return Flag.COMPRESSED, out


class Readable(Protocol):
    def recv_into(self, buffer: memoryview, nbytes: int = ...) -> int: ...


class Writable(Protocol):
    def sendall(self, data: memoryview | bytes | bytearray) -> None: ...


class FrameReader:
    """Reads and verifies frames from a socket into reused buffers."""

    def __init__(self, sock: Readable, max_payload: int = MAX_PAYLOAD) -> None:
        self._sock = sock
        self._hbuf = bytearray(HEADER_SIZE)
        self._hview = memoryview(self._hbuf)
        self._pbuf = bytearray(max_payload)
        self._pview = memoryview(self._pbuf)
        self._dctx = zstandard.ZstdDecompressor()

    def _fill(self, view: memoryview, at_start: bool) -> bool:
        got = 0
        need = len(view)
        while got < need:
            n = self._sock.recv_into(view[got:], need - got)
            if n == 0:
                if got == 0 and at_start:
                    return False
                raise TruncatedFrame(f"stream ended after {got} of {need} bytes of a frame")
            got += n
        return True

    def read(
        self,
        place: Callable[[Header], bytearray | None] | None = None,
        into: Callable[[int], memoryview | None] | None = None,
    ) -> Frame | None:
        """Next verified frame, or None at a clean end of stream between frames.

        Two ways for a caller to keep a frame without copying it out of the reader's reused buffer:
        `place(header)` may return a buffer of HEADER_SIZE + payload_len bytes for the frame to be
        received into (its payload after HEADER_SIZE bytes the caller may put a header in; `Frame.buffer`):
        a process server forwards a frame from memory. `into(n)` may give a buffer of exactly n bytes
        (page-aligned, say) an uncompressed payload of n bytes is received straight into: the master
        target writes it to the replica from there with O_DIRECT.
        """
        if not self._fill(self._hview, at_start=True):
            return None
        h = parse_header(self._hview)
        own = place(h) if place is not None else None
        wire: memoryview | None = None
        if own is not None:
            wire = memoryview(own)[HEADER_SIZE:]
        elif into is not None and not h.flags & Flag.COMPRESSED:
            wire = into(h.payload_len)
        if wire is None:
            wire = self._pview[: h.payload_len]
        self._fill(wire, at_start=False)
        payload: memoryview = wire
        if h.flags & Flag.COMPRESSED:
            try:
                payload = memoryview(self._dctx.decompress(wire, max_output_size=MAX_PAYLOAD))
            except zstandard.ZstdError as exc:
                raise CorruptFrame(h.pair, h.seq, f"zstd: {exc}") from exc
        if h.flags & Flag.ZERO and h.payload_len:
            raise CorruptFrame(h.pair, h.seq, "zero frame with a payload")
        if xxhash.xxh3_128_digest(payload) != h.digest:
            raise CorruptFrame(h.pair, h.seq, "payload digest mismatch")
        return Frame(h, payload, wire, own)


class FrameWriter:
    """Builds and sends frames with one reused header buffer. Not thread-safe: one per sender."""

    def __init__(self, sock: Writable) -> None:
        self._sock = sock
        self._hbuf = bytearray(HEADER_SIZE)

    def send(
        self,
        ftype: FrameType,
        pair: int = 0,
        seq: int = 0,
        offset: int = 0,
        length: int = 0,
        payload: memoryview | bytes = b"",
        flags: Flag = Flag.NONE,
        payload_digest: bytes | None = None,
        wire_payload: memoryview | bytes | None = None,
    ) -> int:
        """Send one frame; `wire_payload` (already compressed) may differ from `payload`.

        Returns the bytes put on the wire.
        """
        wire = payload if wire_payload is None else wire_payload
        d = payload_digest if payload_digest is not None else xxhash.xxh3_128_digest(payload)
        pack_header(self._hbuf, ftype, flags, pair, seq, offset, length, len(wire), d)
        if len(wire) <= 65536:
            self._sock.sendall(bytes(self._hbuf) + bytes(wire))
        else:
            self._sock.sendall(self._hbuf)
            self._sock.sendall(wire)
        return HEADER_SIZE + len(wire)

    def send_raw(self, frame: memoryview | bytes) -> None:
        """Forward an already encoded frame (header + payload) unchanged."""
        self._sock.sendall(frame)

    def send_model(self, ftype: FrameType, model: BaseModel, pair: int = 0, seq: int = 0) -> int:
        return self.send(ftype, pair=pair, seq=seq, payload=model.model_dump_json().encode())


def frame_intact(raw: memoryview | bytes) -> bool:
    """Whether a stored frame (header + wire payload, as cached) still matches its digests."""
    try:
        h = parse_header(raw[:HEADER_SIZE])
        payload: memoryview | bytes = raw[HEADER_SIZE : HEADER_SIZE + h.payload_len]
        if len(payload) != h.payload_len:
            return False
        if h.flags & Flag.COMPRESSED:
            payload = zstandard.ZstdDecompressor().decompress(bytes(payload), max_output_size=MAX_PAYLOAD)
    except (ProtocolError, zstandard.ZstdError):
        return False
    return xxhash.xxh3_128_digest(payload) == h.digest


def encode_frame(
    ftype: FrameType,
    pair: int,
    seq: int,
    offset: int,
    length: int,
    payload: memoryview | bytes,
    flags: Flag = Flag.NONE,
) -> bytes:
    """One complete frame as bytes (for spools and caches, which store frames as on the wire)."""
    hbuf = bytearray(HEADER_SIZE)
    pack_header(hbuf, ftype, flags, pair, seq, offset, length, len(payload), digest(payload))
    return bytes(hbuf) + bytes(payload)


# --- control payloads -------------------------------------------------------------------------


class _Msg(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Role(IntEnum):
    AGENT = 1
    PROCESS_SERVER = 2


class Hello(_Msg):
    """Opens a session: who is sending, which pairs (header pair index = position in `pairs`),
    and for an agent the master target ("host:port") the process server must forward to."""

    component: str
    role: Role
    pairs: list[str]
    master_target: str | None = None


class HelloReply(_Msg):
    """The receiver's durable sequence per pair: the sender resends everything after it."""

    acked: dict[str, int]


class ErrorBody(_Msg):
    """A refused session (e.g. `mt-disk-limit`), sent before the receiver closes."""

    code: str
    message: str
    remediation: str

    @classmethod
    def of(cls, problem: Problem) -> ErrorBody:
        return cls(code=problem.code, message=problem.message, remediation=problem.remediation)


class BookmarkKind(IntEnum):
    CRASH = 1
    APP = 2
    GROUP = 3


class Bookmark(_Msg):
    """A recovery-point marker in a pair's ordered stream."""

    tag: str
    kind: BookmarkKind
    timestamp: float


class ResyncRequest(_Msg):
    """Asks the master target for block digests of its target disk (see blocks.py).

    Without `blocks`: one coarse digest per coarse block of the disk. With `blocks` (coarse block
    indexes): the fine digests of each listed coarse block, concatenated in list order. With
    `blocks` (ascending) and `have` (base64 of the requester's own coarse digests of those blocks,
    concatenated): per block, the target's coarse digest followed, only where it differs from the
    requester's, by its fine digests — one round trip per region, answered while the master
    target keeps hashing the next regions in disk order. With `prefetch` (offset, length pairs,
    flattened): not a query but a hint, never answered — the ranges the requester is about to
    send, whose current bytes the master target reads ahead (its journal's undo records need them).
    """

    coarse: int
    fine: int
    blocks: list[int] | None = None
    have: str | None = None
    prefetch: list[int] | None = None


M = TypeVar("M", bound=BaseModel)


def decode_model(model: type[M], payload: memoryview | bytes) -> M:
    try:
        return model.model_validate(json.loads(bytes(payload)))
    except (ValueError, RecursionError) as exc:  # RecursionError: JSON nested too deep (found by fuzzing)
        raise ProtocolError(f"bad {model.__name__} payload: {exc}") from exc


def read_hello(reader: FrameReader, peer: object) -> Hello:
    """The HELLO a session must open with; anything else from `peer` ends the session."""
    first = reader.read()
    if first is None or first.header.type != FrameType.HELLO:
        raise ProtocolError(f"{peer} did not open with HELLO")
    return decode_model(Hello, first.payload)
