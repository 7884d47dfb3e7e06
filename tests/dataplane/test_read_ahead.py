"""The master target reads frames ahead of applying them (issue 16): each frame keeps its own
bytes until released, reading stops at the bound, a corrupt frame is raised in its place."""

from __future__ import annotations

import os
import socket
import threading

import pytest

from siterecovery.dataplane import read_ahead
from siterecovery.dataplane.protocol import CorruptFrame, FrameType, encode_frame
from siterecovery.dataplane.read_ahead import ReadAhead

MiB = 1 << 20


def test_frames_read_ahead_keep_their_bytes_until_released(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(read_ahead, "AHEAD_BYTES", 2 * MiB)  # at most about two frames ahead
    payloads = [os.urandom(MiB) for _ in range(6)]
    ours, theirs = socket.socketpair()
    bad = bytearray(encode_frame(FrameType.BLOCK, 0, 7, 6 * MiB, 4096, os.urandom(4096)))
    bad[-1] ^= 1  # a flipped payload byte

    def send() -> None:
        for i, p in enumerate(payloads):
            theirs.sendall(encode_frame(FrameType.BLOCK, 0, i + 1, i * MiB, MiB, p))
        theirs.sendall(bytes(bad))

    sender = threading.Thread(target=send)
    sender.start()
    ahead = ReadAhead(ours, "test")
    try:
        first, second = ahead.next(), ahead.next()
        assert first is not None and second is not None
        # Reading on stops at the bound (two frames queued, one being read): the sender, with 7
        # MiB to send through a socket buffer far smaller, cannot finish until more are taken.
        sender.join(timeout=0.5)
        assert sender.is_alive()
        assert bytes(first.payload) == payloads[0] and bytes(second.payload) == payloads[1]
        ahead.release(first)
        ahead.release(second)
        for i in range(2, 6):
            frame = ahead.next()
            assert frame is not None and frame.header.seq == i + 1
            assert bytes(frame.payload) == payloads[i]
            ahead.release(frame)
        with pytest.raises(CorruptFrame):
            ahead.next()
        sender.join(timeout=30)
        assert not sender.is_alive()
    finally:
        ahead.close()
        ours.close()
        theirs.close()


def test_the_end_of_the_stream_is_none_and_close_stops_a_blocked_reader() -> None:
    ours, theirs = socket.socketpair()
    ahead = ReadAhead(ours, "test")
    theirs.sendall(encode_frame(FrameType.HEARTBEAT, 0, 0, 0, 0, b""))
    assert ahead.ready(30)
    frame = ahead.next()
    assert frame is not None and frame.header.type == FrameType.HEARTBEAT
    assert not ahead.ready(0)
    ahead.close()  # the reader is blocked in recv: shutting the read side wakes it
    theirs.close()
    ours.close()

    ours, theirs = socket.socketpair()
    ahead = ReadAhead(ours, "test")
    theirs.close()
    assert ahead.next() is None
    ahead.close()
    ours.close()
