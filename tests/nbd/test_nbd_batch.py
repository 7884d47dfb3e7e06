"""Pipelined writes reach the image and the sink as batches, in the order they were sent.

A client that sends many requests at once (fio, a guest's queue) has them read in one receive; the
run of plain writes in it is applied as one batch and handed to a batch-taking sink in one call.
Anything else in the stream (an all-zero payload, a FUA write, a bad request) is taken on its own,
after the writes before it: the sink must see exactly the order of the stream, whichever way the
server grouped it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from siterecovery.dataplane.activity_log import ActivityLog
from siterecovery.dataplane.nbd.image import Export
from siterecovery.dataplane.nbd.server import run_nbd_server_in_thread
from siterecovery.dataplane.nbd.wire import (
    REQUEST,
    REQUEST_MAGIC,
    SIMPLE_REPLY,
    SIMPLE_REPLY_MAGIC,
    Cmd,
    CmdFlag,
)
from siterecovery.dataplane.nbd_client import NbdClient
from tests.nbd.conftest import IMAGE_SIZE, RecordingSink, make_image


class BatchRecordingSink(RecordingSink):
    """A real batch-taking sink (`BatchSink`) that keeps its records in memory."""

    def record_writes(self, writes: Sequence[tuple[int, memoryview]]) -> None:
        for offset, data in writes:
            self.record_write(offset, data)


def test_pipelined_writes_are_captured_in_stream_order(tmp_path: Path) -> None:
    image = make_image(tmp_path / "disk.img")
    sink = BatchRecordingSink()
    sock = Path(f"/tmp/nbd-batch-{os.getpid()}.sock")
    payload = {n: os.urandom(4096) for n in range(8)}
    # (flags, offset, data): overlapping writes, a zero payload and a FUA write in the middle.
    stream: list[tuple[int, int, bytes]] = [
        (0, 0, payload[0] + payload[1]),
        (0, 4096, payload[2]),
        (0, 65536, bytes(4096)),
        (0, 4096, payload[3]),
        (int(CmdFlag.FUA), 8192, payload[4]),
        (0, 100, payload[5]),  # misaligned: refused, nothing recorded
        (0, 0, payload[6]),
        (0, 12288, payload[7]),
    ]
    with (
        run_nbd_server_in_thread([Export.for_image("disk", image, sink)], unix=sock),
        NbdClient.connect("disk", unix=sock, structured=False) as client,
    ):
        client._sock.sendall(
            b"".join(
                REQUEST.pack(REQUEST_MAGIC, flags, Cmd.WRITE, i, offset, len(data)) + data
                for i, (flags, offset, data) in enumerate(stream)
            )
        )
        header = bytearray(16)
        errors = {}
        for _ in stream:
            client._recv_into(memoryview(header))
            magic, error, cookie = SIMPLE_REPLY.unpack(header)
            assert magic == SIMPLE_REPLY_MAGIC
            errors[cookie] = error
        client._cookie = len(stream)
    assert [errors[i] for i in range(len(stream))] == [0, 0, 0, 0, 0, 22, 0, 0]
    assert [(kind, offset) for _, kind, offset, _ in sink.records] == [
        ("write", 0),
        ("write", 4096),
        ("zero", 65536),
        ("write", 4096),
        ("write", 8192),
        ("write", 0),
        ("write", 12288),
    ]
    assert sink.flushes >= 1  # the FUA write
    replayed = tmp_path / "replayed.img"
    sink.replay(replayed, IMAGE_SIZE)
    assert replayed.read_bytes() == image.read_bytes()


class IntentCheckingSink(BatchRecordingSink):
    """Checks, as each write reaches it (after the image), that the write-intent log on disk marks
    the write's extent: the durability rule a batch must keep."""

    def __init__(self, log_path: Path, extent: int) -> None:
        super().__init__()
        self.log_path, self.extent = log_path, extent
        self.unmarked: list[int] = []

    def record_write(self, offset: int, data: memoryview) -> int:
        bits = self.log_path.read_bytes()[16:]  # after the 16-byte header
        e = offset // self.extent
        if not bits[e >> 3] & (1 << (e & 7)):
            self.unmarked.append(offset)
        return super().record_write(offset, data)


def test_every_batched_write_is_marked_on_disk_when_it_is_captured(tmp_path: Path) -> None:
    image = make_image(tmp_path / "disk.img")
    log_path = tmp_path / "disk.al"
    # Room for two marked extents only: marks beyond them unmark the durable ones.
    intent = ActivityLog(log_path, IMAGE_SIZE, limit=2)
    sink = IntentCheckingSink(log_path, intent.extent)
    sock = Path(f"/tmp/nbd-batch-al-{os.getpid()}.sock")
    data = os.urandom(4096)
    # New extents with an unmarked one before each, so none is marked ahead of a stream.
    rounds = [[0, 0, 3 * r] for r in range(1, 5)]
    with (
        run_nbd_server_in_thread([Export.for_image("disk", image, sink, intent=intent)], unix=sock),
        NbdClient.connect("disk", unix=sock, structured=False) as client,
    ):
        for extents in rounds:
            # After the flush ending the round before, extent 0 is marked and durable: the new
            # extent's mark, in the same receive as writes to extent 0, unmarks it unless those
            # writes were captured first.
            requests = [
                REQUEST.pack(REQUEST_MAGIC, 0, Cmd.WRITE, i, e * intent.extent, 4096) + data
                for i, e in enumerate(extents)
            ]
            client._sock.sendall(b"".join(requests))
            header = bytearray(16)
            for _ in extents:
                client._recv_into(memoryview(header))
                assert SIMPLE_REPLY.unpack(header)[1] == 0
            client._cookie = 0
            client.flush()
    assert len(sink.records) == sum(len(extents) for extents in rounds)
    assert sink.unmarked == []
