"""The NBD client's block status against real servers: qemu-nbd and the agent's export.

The extents the client reports must be the ones `qemu-img map` sees in the same sparse image, reads
with structured replies (data and hole chunks) must return the image's bytes, and the lab oracle
fed those extents must read only the data yet still find a valid record after a gap. A client that
does not negotiate structured replies gets one data extent and reads it all, and so does one talking
to an old server (nbdkit `--no-sr`, which refuses them).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from siterecovery.dataplane.nbd.wire import STATE_HOLE, STATE_ZERO, NbdErrno
from siterecovery.dataplane.nbd_client import Extent, NbdClient, NbdError
from siterecovery.lab import verify_log
from siterecovery.lab.oracle import file_data_ranges
from siterecovery.lab.records import RECORD_SIZE, RecordKind, encode_record
from tests.conftest import require_tool
from tests.nbd.conftest import IMAGE_SIZE, Served

MiB = 1024 * 1024
# (offset, length) of the data written into the sparse image; the rest stays a hole.
EXTENTS = [(0, 64 * 1024), (MiB + 4096, 8192), (10 * MiB, 2 * MiB), (IMAGE_SIZE - 4096, 4096)]


def _sparse_image(path: Path) -> Path:
    with open(path, "wb") as f:
        f.truncate(IMAGE_SIZE)
        for offset, length in EXTENTS:
            f.seek(offset)
            f.write(os.urandom(length))
    return path


def _merged(runs: list[tuple[int, int, bool, bool]]) -> list[tuple[int, int, bool, bool]]:
    """(start, length, zero, data) runs with equal neighbours joined: granularity is the server's."""
    out: list[tuple[int, int, bool, bool]] = []
    for start, length, zero, data in runs:
        if out and out[-1][2:] == (zero, data) and sum(out[-1][:2]) == start:
            out[-1] = (out[-1][0], out[-1][1] + length, zero, data)
        else:
            out.append((start, length, zero, data))
    return out


@contextlib.contextmanager
def _qemu_nbd(image: Path, name: str) -> Iterator[Path]:
    """qemu-nbd serving the raw `image` as export `name` on a Unix socket beside it."""
    sock = image.with_suffix(".sock")
    cmd = [require_tool("qemu-nbd"), "--socket", str(sock), "--format", "raw", "--persistent"]
    with _serving([*cmd, "--export-name", name, str(image)], sock, "qemu-nbd"):
        yield sock


@contextlib.contextmanager
def _serving(cmd: list[str], sock: Path, what: str) -> Iterator[None]:
    """Run the NBD server `cmd` until the block ends, once its Unix socket `sock` exists."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not sock.exists():
            assert proc.poll() is None and time.monotonic() < deadline, f"{what} did not start"
            time.sleep(0.02)
        yield
    finally:
        proc.terminate()
        proc.wait(30)


@pytest.fixture
def qemu_nbd(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    image = _sparse_image(tmp_path / "sparse.img")
    with _qemu_nbd(image, "data") as sock:
        yield image, sock


def test_extents_from_qemu_nbd_match_qemu_img_map(qemu_nbd: tuple[Path, Path]) -> None:
    image, sock = qemu_nbd
    # qemu-img map reads the file itself (-U: qemu-nbd holds it open), the client asks qemu-nbd.
    mapped = subprocess.run(
        [require_tool("qemu-img"), "map", "-U", "--output=json", "-f", "raw", str(image)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    expected = _merged([(e["start"], e["length"], e["zero"], e["data"]) for e in json.loads(mapped.stdout)])
    with NbdClient.connect("data", unix=sock) as client:
        assert client.structured and client.can_block_status
        extents = client.block_status()
        got = _merged([(e.offset, e.length, e.zero, not e.hole) for e in extents])
        assert got == expected
        assert [(o, n) for o, n, _, data in expected if data] == client.data_ranges() == EXTENTS
        # A range starting inside a hole and ending inside data is clipped to what was asked.
        part = client.block_status(MiB, 4096 + 4096)
        assert part == [Extent(MiB, 4096, STATE_HOLE | STATE_ZERO), Extent(MiB + 4096, 4096, 0)]
        # Structured reads over holes and data (qemu-nbd answers with hole and data chunks).
        assert client.pread(16 * MiB, 0) == image.read_bytes()[: 16 * MiB]


def test_oracle_over_qemu_nbd_reads_only_data_and_finds_a_record_after_the_gap(tmp_path: Path) -> None:
    image = tmp_path / "log.img"
    with open(image, "wb") as f:
        f.truncate(IMAGE_SIZE)
    with _qemu_nbd(image, "log") as sock, NbdClient.connect("log", unix=sock) as client:
        buf = bytearray(RECORD_SIZE)
        for seq in range(1, 51):
            encode_record(buf, seq, "vm-1", RecordKind.DATA)
            client.pwrite(buf, (seq - 1) * RECORD_SIZE)
        clean = verify_log(
            lambda o, n: client.pread(n, o), client.size, "vm-1", data_ranges=client.data_ranges()
        )
        assert clean.ok and clean.records == 50
        # A valid record far after the gap (writes lost or reordered): still found.
        encode_record(buf, 12_000, "vm-1", RecordKind.DATA)
        client.pwrite(buf, 11_999 * RECORD_SIZE)
        client.flush()
        read: list[int] = []

        def read_at(offset: int, length: int) -> bytes:
            read.append(length)
            return client.pread(length, offset)

        verdict = verify_log(read_at, client.size, "vm-1", data_ranges=client.data_ranges())
        assert not verdict.ok and verdict.first_bad == 51 and "slot 12000" in verdict.reason
        assert sum(read) == 51 * RECORD_SIZE  # the 50 records and the one slot, not 64 MiB


def test_agent_export_reports_written_ranges_and_old_clients_read_everything(served: Served) -> None:
    with NbdClient.connect("disk0", unix=served.socket) as client:
        assert client.structured and client.can_block_status
        assert client.data_ranges() == []
        for offset, length in EXTENTS:
            client.pwrite(os.urandom(length), offset)
        client.zero(10 * MiB, MiB)  # punched: the first half of the third extent is a hole again
        expected = [EXTENTS[0], EXTENTS[1], (11 * MiB, MiB), EXTENTS[3]]
        assert client.data_ranges() == expected
        extents = client.block_status()
        assert sum(e.length for e in extents) == IMAGE_SIZE
        assert all(e.flags == (STATE_HOLE | STATE_ZERO if e.zero else 0) for e in extents)
        # Structured read errors still carry the server's errno, and the connection stays in step.
        with pytest.raises(NbdError) as err:
            client.pread(100, 0)
        assert err.value.errno == NbdErrno.EINVAL
        assert client.pread(4096, IMAGE_SIZE - 4096) == served.image.read_bytes()[-4096:]
    with NbdClient.connect("disk0", unix=served.socket, structured=False) as old:
        assert not old.structured and not old.can_block_status
        assert old.block_status() == [Extent(0, IMAGE_SIZE, 0)]
        assert old.data_ranges() == [(0, IMAGE_SIZE)]
        assert old.pread(2 * MiB, 0) == served.image.read_bytes()[: 2 * MiB]


@contextlib.contextmanager
def _nbdkit(image: Path, sock: Path, *options: str) -> Iterator[Path]:
    """nbdkit's file plugin serving `image` on the Unix socket `sock` (a new path: it is waited for)."""
    cmd = [require_tool("nbdkit"), "--foreground", "--unix", str(sock), *options, "file", f"file={image}"]
    with _serving(cmd, sock, "nbdkit"):
        yield sock


def test_old_server_without_structured_replies_is_read_in_full(tmp_path: Path) -> None:
    image = _sparse_image(tmp_path / "old.img")
    # The same record layout as above: 50 records, then a valid one far after the gap.
    buf = bytearray(RECORD_SIZE)
    with open(image, "r+b") as f:
        for seq in (*range(1, 51), 12_000):
            encode_record(buf, seq, "vm-1", RecordKind.DATA)
            f.seek((seq - 1) * RECORD_SIZE)
            f.write(buf)
    content = image.read_bytes()
    with _nbdkit(image, tmp_path / "modern.sock") as sock, NbdClient.connect("", unix=sock) as modern:
        assert modern.can_block_status  # nbdkit offers base:allocation when it may
        with open(image, "rb") as f:
            assert modern.data_ranges() == file_data_ranges(f.fileno(), IMAGE_SIZE)
    with _nbdkit(image, tmp_path / "old.sock", "--no-sr") as sock, NbdClient.connect("", unix=sock) as client:
        assert not client.structured and not client.can_block_status
        assert client.data_ranges() == [(0, IMAGE_SIZE)]
        assert client.pread(4 * MiB, 0) == content[: 4 * MiB]
        read: list[int] = []

        def read_at(offset: int, length: int) -> bytes:
            read.append(length)
            return client.pread(length, offset)

        verdict = verify_log(read_at, client.size, "vm-1", data_ranges=client.data_ranges())
        assert not verdict.ok and verdict.first_bad == 51 and "slot 12000" in verdict.reason
        assert sum(read) >= 12_000 * RECORD_SIZE  # everything up to the record was read
