"""Property-based tests of the replication frame decoder (dataplane/protocol.py).

Whatever bytes arrive, the decoder either returns verified frames or raises the protocol's own
`ProtocolError` (CorruptFrame and TruncatedFrame are kinds of it): never another exception, and
it never waits for bytes that will not come. The bytes travel through a real socket pair, as they
do between the data-plane components. Bounded and deterministic: a fixed number of examples,
derandomized, no deadline (CI machines are slow and shared).
"""

from __future__ import annotations

import contextlib
import json
import socket
import struct
import zlib

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from siterecovery.dataplane.protocol import (
    HEADER_SIZE,
    MAX_PAYLOAD,
    Bookmark,
    Flag,
    FrameReader,
    FrameType,
    Hello,
    ProtocolError,
    ResyncRequest,
    decode_model,
    encode_frame,
)

FUZZ = settings(
    max_examples=200,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
_U64 = st.integers(0, 2**64 - 1)
_CRC_SPAN = HEADER_SIZE - 4


def read_all(stream: bytes) -> list[tuple[int, int, bytes]]:
    """Every frame the decoder finds in `stream`, until a clean end or a ProtocolError."""
    left, right = socket.socketpair()
    with left, right:
        # Never more than a socket buffer holds, so the writer cannot block before the reader.
        assert len(stream) < 100_000
        left.sendall(stream)
        left.shutdown(socket.SHUT_WR)
        right.settimeout(30)  # a decoder waiting for bytes that never come fails loudly
        reader = FrameReader(right)
        frames = []
        try:
            while (frame := reader.read()) is not None:
                frames.append((int(frame.header.type), frame.header.seq, bytes(frame.payload)))
        except ProtocolError:
            pass
        return frames


def reseal(frame: bytearray) -> bytes:
    """Recompute the header CRC, so a changed header field reaches the checks behind the CRC."""
    struct.pack_into("!I", frame, _CRC_SPAN, zlib.crc32(bytes(frame[:_CRC_SPAN])))
    return bytes(frame)


@FUZZ
@given(st.binary(max_size=4096))
@example(b"")
@example(b"SRDP")
@example(b"SRDP" + bytes(HEADER_SIZE - 4))
def test_arbitrary_bytes_are_frames_or_a_protocol_error(stream: bytes) -> None:
    read_all(stream)


frame_types = st.sampled_from(list(FrameType))
payloads = st.binary(max_size=2048)


@FUZZ
@given(
    ftype=frame_types,
    seq=_U64,
    offset=_U64,
    payload=payloads,
    flips=st.lists(st.tuples(st.integers(0, 10_000), st.integers(1, 255)), max_size=4),
    cut=st.integers(0, 10_000),
)
def test_damaged_frames_are_refused_never_misread(
    ftype: FrameType, seq: int, offset: int, payload: bytes, flips: list[tuple[int, int]], cut: int
) -> None:
    good = encode_frame(ftype, 0, seq, offset, len(payload), payload)
    assert read_all(good) == [(int(ftype), seq, payload)]
    damaged = bytearray(good)
    for at, xor in flips:
        damaged[at % len(damaged)] ^= xor
    damaged = damaged[: len(damaged) - cut % (len(damaged) + 1)]
    frames = read_all(bytes(damaged))
    # A flipped bit is caught by the header CRC or the payload digest: a damaged frame is never
    # returned as something else (flips that cancel out give back the original frame).
    assert frames in ([], [(int(ftype), seq, payload)])


@FUZZ
@given(
    field=st.sampled_from(["version", "type", "flags", "payload_len"]),
    value=st.integers(0, 2**32 - 1),
    payload=payloads,
    compressed_garbage=st.booleans(),
)
@example(field="payload_len", value=MAX_PAYLOAD + 1, payload=b"", compressed_garbage=False)
@example(field="flags", value=int(Flag.ZERO), payload=b"x", compressed_garbage=False)
def test_well_sealed_headers_with_odd_fields_are_refused_cleanly(
    field: str, value: int, payload: bytes, compressed_garbage: bool
) -> None:
    """Fields behind a valid CRC: unknown versions, types and flags, lengths that lie, bad zstd."""
    frame = bytearray(encode_frame(FrameType.WRITE, 0, 1, 0, len(payload), payload))
    layout = {"version": (4, "!B"), "type": (5, "!B"), "flags": (6, "!H"), "payload_len": (40, "!I")}
    at, fmt = layout[field]
    struct.pack_into(fmt, frame, at, value % (1 << (8 * struct.calcsize(fmt))))
    if compressed_garbage:
        struct.pack_into("!H", frame, 6, int(Flag.COMPRESSED))
    read_all(reseal(frame))


@FUZZ
@given(st.binary(max_size=512))
def test_compressed_payloads_that_are_not_zstd_are_corrupt_frames(garbage: bytes) -> None:
    frame = bytearray(encode_frame(FrameType.WRITE, 0, 1, 0, 0, garbage, Flag.COMPRESSED))
    # The digest covers the uncompressed payload, so even bytes that happen to be zstd fail it.
    assert read_all(bytes(frame)) == []


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=20,
)


@FUZZ
@given(
    model=st.sampled_from([Hello, Bookmark, ResyncRequest]),
    raw=st.binary(max_size=512) | json_values.map(lambda v: json.dumps(v).encode()),
)
@example(model=Hello, raw=b"[" * 100_000)
@example(model=Hello, raw=b"\xff\xfe")
def test_control_payloads_parse_or_raise_protocol_error(model: type[Hello], raw: bytes) -> None:
    with contextlib.suppress(ProtocolError):
        decode_model(model, raw)
