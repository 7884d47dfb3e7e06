"""Fixtures for the NBD export tests: a sparse image served by a real server on loopback."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from siterecovery.dataplane.nbd.image import Export
from siterecovery.dataplane.nbd.server import ServerThread, run_nbd_server_in_thread

IMAGE_SIZE = 64 * 1024 * 1024


@dataclass
class RecordingSink:
    """A real CaptureSink that keeps what it is told in memory, numbering writes from 1."""

    records: list[tuple[int, str, int, bytes | int]] = field(default_factory=list)
    flushes: int = 0

    def record_write(self, offset: int, data: memoryview) -> int:
        self.records.append((len(self.records) + 1, "write", offset, bytes(data)))
        return len(self.records)

    def record_zero(self, offset: int, length: int) -> int:
        self.records.append((len(self.records) + 1, "zero", offset, length))
        return len(self.records)

    def flush(self) -> None:
        self.flushes += 1

    def replay(self, path: Path, size: int) -> None:
        """Apply the records, in order, to a fresh image: it must equal the served one."""
        with open(path, "wb") as f:
            f.truncate(size)
            for _seq, _kind, offset, payload in self.records:
                f.seek(offset)
                f.write(payload if isinstance(payload, bytes) else bytes(payload))


@dataclass
class Served:
    handle: ServerThread
    image: Path
    socket: Path
    sink: RecordingSink

    def uri(self, name: str = "disk0") -> str:
        return f"nbd+unix:///{name}?socket={self.socket}"

    @property
    def tcp_port(self) -> int:
        port = self.handle.tcp_port
        assert port is not None
        return port


def make_image(path: Path, size: int = IMAGE_SIZE) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
    return path


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    image = make_image(tmp_path / "disk0.img")
    other = make_image(tmp_path / "disk1.img", 16 * 1024 * 1024)
    sink = RecordingSink()
    # Unix socket paths are limited to 108 bytes; pytest's tmp_path can be longer.
    sock = Path(f"/tmp/nbd-test-{os.getpid()}-{id(sink)}.sock")
    handle = run_nbd_server_in_thread(
        [Export.for_image("disk0", image, sink), Export.for_image("disk1", other, read_only=True)],
        unix=sock,
        tcp=("127.0.0.1", 0),
    )
    try:
        yield Served(handle, image, sock, sink)
    finally:
        handle.stop()
