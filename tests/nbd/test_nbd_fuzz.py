"""Property-based tests of the NBD export's parser (dataplane/nbd/), over real sockets.

Whatever a client sends — in the handshake or as transmission requests — the server answers,
or refuses and closes that one connection (its protocol error); it never raises anything else,
never hangs on a connection whose client has finished sending, and keeps serving the others
with unchanged data. An unexpected exception inside the asyncio protocol would be logged by
asyncio at ERROR level and would only close the connection, so every ERROR log record during the
test fails it. Bounded and deterministic: a fixed number of examples, derandomized, no deadline.
"""

from __future__ import annotations

import logging
import socket
import struct
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from siterecovery.dataplane.nbd.wire import IHAVEOPT, REQUEST, REQUEST_MAGIC, Cmd, HandshakeFlag
from siterecovery.dataplane.nbd_client import NbdClient
from tests.nbd.conftest import IMAGE_SIZE, Served

FUZZ = settings(
    max_examples=60,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
GREETING = 18  # NBDMAGIC, IHAVEOPT, handshake flags


class ErrorRecords(logging.Handler):
    """Keeps the ERROR records logged anywhere while installed."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def errors() -> Iterator[ErrorRecords]:
    handler = ErrorRecords()
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield handler
    finally:
        root.removeHandler(handler)


def send_and_drain(sock: socket.socket, stream: bytes) -> bytes:
    """Send `stream`, end our side, and take what the server sends until it closes.

    The server may close first (that is how it refuses); a server still waiting when the client
    has ended its side times out here, and fails the test."""
    sock.settimeout(30)
    try:
        sock.sendall(stream)
        sock.shutdown(socket.SHUT_WR)
    except (BrokenPipeError, ConnectionResetError):
        pass
    out = b""
    try:
        while chunk := sock.recv(65536):
            out += chunk
    except ConnectionResetError:
        pass
    return out


def still_serving(served: Served) -> None:
    with NbdClient.connect("disk1", unix=served.socket) as client:
        assert client.pread(4096, 0) == bytes(4096)  # the read-only export is never written


u32 = st.integers(0, 2**32 - 1)
u64 = st.integers(0, 2**64 - 1)
options = st.tuples(
    st.sampled_from([IHAVEOPT, IHAVEOPT, IHAVEOPT, 0]),
    st.integers(0, 12) | u32,
    st.binary(max_size=64),
    st.sampled_from(["exact", "short", "long", "huge"]),
)


def encode_option(magic: int, opt: int, data: bytes, declared: str) -> bytes:
    length = {"exact": len(data), "short": max(0, len(data) - 1), "long": len(data) + 7, "huge": 2**32 - 1}
    return struct.pack(">QII", magic, opt, length[declared]) + data


@FUZZ
@given(
    flags=st.sampled_from([int(HandshakeFlag.FIXED_NEWSTYLE | HandshakeFlag.NO_ZEROES), 1, 0]) | u32,
    opts=st.lists(options, max_size=5),
    tail=st.binary(max_size=64),
)
@example(flags=3, opts=[(IHAVEOPT, 9, b"\xff" * 10, "exact")], tail=b"")  # NBD_OPT_INFO with garbage
@example(flags=3, opts=[(IHAVEOPT, 10, struct.pack(">I", 2**31) + b"x", "exact")], tail=b"")
def test_handshake_bytes_are_answered_or_refused(
    served: Served, errors: ErrorRecords, flags: int, opts: list[tuple[int, int, bytes, str]], tail: bytes
) -> None:
    stream = struct.pack(">I", flags) + b"".join(encode_option(*o) for o in opts) + tail
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(str(served.socket))
        sock.settimeout(30)
        assert len(sock.recv(GREETING, socket.MSG_WAITALL)) == GREETING
        send_and_drain(sock, stream)
    assert errors.records == []


requests = st.tuples(
    st.sampled_from([REQUEST_MAGIC] * 9 + [0x12345678]),
    st.integers(0, 0xFFFF),  # command flags
    st.sampled_from(list(Cmd)) | st.integers(0, 0xFFFF),
    st.sampled_from([0, 4096, IMAGE_SIZE - 512, IMAGE_SIZE, 2**63]) | u64,
    st.sampled_from([0, 1, 512, 4096]) | u32,
    st.binary(max_size=4096),  # what follows (a write's payload, or not)
)


@FUZZ
@given(reqs=st.lists(requests, min_size=1, max_size=6))
@example(reqs=[(REQUEST_MAGIC, 0, int(Cmd.WRITE), 0, 2**32 - 1, b"")])
@example(reqs=[(REQUEST_MAGIC, 0, int(Cmd.READ), 2**64 - 512, 512, b"")])
@example(reqs=[(REQUEST_MAGIC, 0xFFFF, int(Cmd.BLOCK_STATUS), 0, 2**32 - 1, b"")])
def test_transmission_requests_are_answered_or_refused(
    served: Served, errors: ErrorRecords, reqs: list[tuple[int, int, int, int, int, bytes]]
) -> None:
    with NbdClient.connect("disk0", unix=served.socket) as client:
        stream = b"".join(REQUEST.pack(m, f, c, 0xC0FFEE, o, n) + after for m, f, c, o, n, after in reqs)
        send_and_drain(client._sock, stream)
    assert errors.records == []
    still_serving(served)
