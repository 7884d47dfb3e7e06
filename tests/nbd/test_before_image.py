"""Before-image logs under the real NBD export: a revert undoes every write, even after kill -9."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

import pytest

from siterecovery.dataplane import before_image
from siterecovery.dataplane.apply import punch_or_zero
from siterecovery.dataplane.before_image import DEFAULT_CHUNK, BeforeImageLog, log_path
from siterecovery.dataplane.nbd.image import Export
from siterecovery.dataplane.nbd.server import run_nbd_server_in_thread
from siterecovery.errors import SiteRecoveryError
from tests.conftest import data_extents, require_tool

MiB = 1024 * 1024
CHUNK = DEFAULT_CHUNK
RECORD = 32  # a record's header; the file header is the same size
SIZE = 32 * MiB
# Not a multiple of the chunk (nor of 4 KiB): the last chunk is clipped at the disk's end.
CLIPPED_SIZE = 17 * MiB - 1536
# Written before the snapshot: data here, holes everywhere else (4 KiB aligned, so the map is exact).
DATA_AT = [(0, 1 * MiB), (3 * MiB + 8192, 200 * 1024), (9 * MiB, 2 * MiB), (16 * MiB - 4096, 4096)]


def make_disk(path: Path, size: int = SIZE) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
        for offset, length in DATA_AT:
            f.seek(offset)
            f.write(os.urandom(length))
    return path


def punch_or_zero_file(path: Path, offset: int, length: int) -> None:
    fd = os.open(path, os.O_RDWR)
    try:
        punch_or_zero(fd, offset, length)
    finally:
        os.close(fd)


def run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{args[0]} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return proc


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    # Unix socket paths are limited to 108 bytes; pytest's tmp_path can be longer.
    path = Path(tempfile.mkdtemp(prefix="bi-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@contextmanager
def serving(image: Path, sock_dir: Path) -> Iterator[str]:
    """The image served by the real NBD server in this process; yields its URI."""
    sock = sock_dir / "disk0.sock"
    handle = run_nbd_server_in_thread([Export.for_image("disk0", image)], unix=sock)
    try:
        yield f"nbd+unix:///disk0?socket={sock}"
    finally:
        handle.stop()


def qemu_io(uri: str, *commands: str) -> None:
    args = [require_tool("qemu-io"), "-f", "raw", uri]
    for command in commands:
        args += ["-c", command]
    out = run(*args).stdout
    assert "error" not in out.lower() and "failed" not in out.lower(), out


@pytest.fixture
def snapshot(tmp_path: Path) -> tuple[Path, Path]:
    """A disk with data and holes, a log started on it, and a sparse copy taken at that moment."""
    image = make_disk(tmp_path / "disk0.img")
    before_image.create(image)
    copy = tmp_path / "snapshot.img"
    run("cp", "--sparse=always", str(image), str(copy))
    return image, copy


def assert_reverted(image: Path, copy: Path) -> None:
    assert image.read_bytes() == copy.read_bytes()
    run(require_tool("qemu-img"), "compare", "-q", "-f", "raw", "-F", "raw", str(image), str(copy))
    assert data_extents(image) == data_extents(copy), "holes of the snapshot must still be holes"


KiB = 1024
# (qemu-io command, offset, length): overlapping, unaligned, zeroes with and without holes, trims.
WRITES = [
    ("write -P 0x11 0 64k", 0, 64 * KiB),
    ("write -P 0x22 1000 3000", 1000, 3000),  # unaligned: read-modify-write inside one chunk
    ("write -P 0x33 700k 3M", 700 * KiB, 3 * MiB),  # spans data and hole chunks
    ("write -P 0x44 2M 512", 2 * MiB, 512),  # a hole chunk becomes data
    ("write -z 9M 1M", 9 * MiB, 1 * MiB),  # write-zeroes keeping the blocks allocated (NO_HOLE)
    ("discard 9728k 1M", 9728 * KiB, 1 * MiB),  # trim straddling data and a hole
    ("write -P 0x55 4M 8M", 4 * MiB, 8 * MiB),  # overlaps the earlier ones
    ("write -z -u 14M 2M", 14 * MiB, 2 * MiB),  # zeroes that may punch, over data and holes
    ("write -P 0x66 0 4k", 0, 4 * KiB),  # again: already saved, costs nothing
]


def chunks_touched(ranges: list[tuple[int, int]]) -> set[int]:
    return {
        i for offset, length in ranges for i in range(offset // CHUNK, (offset + length - 1) // CHUNK + 1)
    }


@pytest.mark.parametrize(
    "size",
    [pytest.param(SIZE, id="chunk-aligned-disk"), pytest.param(CLIPPED_SIZE, id="clipped-last-chunk")],
)
def test_revert_undoes_every_write_through_the_export(tmp_path: Path, sock_dir: Path, size: int) -> None:
    image = make_disk(tmp_path / "disk0.img", size)
    before_image.create(image)
    copy = tmp_path / "snapshot.img"
    run("cp", "--sparse=always", str(image), str(copy))
    writes = [*WRITES, (f"write -P 0x77 {size - 512} 512", size - 512, 512)]
    with serving(image, sock_dir) as uri:
        qemu_io(uri, *(command for command, _, _ in writes), f"read -P 0x77 {size - 512} 512")
        with pytest.raises(SiteRecoveryError) as err:
            before_image.restore(image)  # the machine is still on
        assert err.value.first.code == "before-image-in-use"
    assert image.read_bytes() != copy.read_bytes()

    restored = before_image.restore(image)

    assert_reverted(image, copy)
    # Every chunk the writes touched, each saved once (the clipped last one is shorter).
    touched = chunks_touched([(offset, length) for _, offset, length in writes])
    assert restored == len(touched) * CHUNK - (-size % CHUNK)
    assert log_path(image).stat().st_size == RECORD


def test_rewriting_a_region_saves_it_once(snapshot: tuple[Path, Path], sock_dir: Path) -> None:
    image, copy = snapshot
    with serving(image, sock_dir) as uri:
        qemu_io(uri, *(f"write -P {p} 4M 1M" for p in range(1, 21)), "write -P 0x21 4296704 1000")
    with open(image, "rb") as disk:
        log = BeforeImageLog.open_for(image, disk.fileno())
        assert log is not None
        try:
            assert log.saved_bytes == 1 * MiB
        finally:
            log.close()
    # The region was a hole: sixteen zero records and no payload at all.
    assert log_path(image).stat().st_size == RECORD + 16 * RECORD
    assert before_image.restore(image) == 1 * MiB
    assert_reverted(image, copy)


def test_preserve_saves_a_data_chunk_with_its_payload(snapshot: tuple[Path, Path]) -> None:
    image, _ = snapshot
    fd = os.open(image, os.O_RDWR)
    try:
        log = BeforeImageLog.open_for(image, fd)
        assert log is not None
        for _ in range(5):
            log.preserve(100, 2 * CHUNK)  # three chunks of data
            log.preserve(5 * MiB, 10)  # one hole chunk
        assert log.saved_bytes == 4 * CHUNK and log.active
        log.close()
        assert not log.active
    finally:
        os.close(fd)
    assert log_path(image).stat().st_size == RECORD + 3 * (RECORD + CHUNK) + RECORD


def test_preserve_all_saves_the_ranges_of_queued_requests_under_one_fdatasync(
    snapshot: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    image, copy = snapshot
    syncs: list[int] = []
    real = os.fdatasync

    def counting(fd: int) -> None:
        syncs.append(fd)
        real(fd)

    fd = os.open(image, os.O_RDWR)
    try:
        log = BeforeImageLog.open_for(image, fd)
        assert log is not None
        ranges = [(100, 2 * CHUNK), (5 * MiB, 10), (150, 10), (SIZE - 10, 100), (SIZE + CHUNK, 10)]
        assert not log.covers(100, 2 * CHUNK)
        monkeypatch.setattr(os, "fdatasync", counting)
        log.preserve_all(ranges)
        assert len(syncs) == 1  # three data chunks, a hole chunk and the last chunk in one go
        assert all(log.covers(offset, length) for offset, length in ranges)
        log.preserve_all(ranges)
        log.preserve(100, 10)
        assert len(syncs) == 1  # all saved already: bit tests only
        monkeypatch.undo()
        assert log.saved_bytes == 5 * CHUNK
        # Overwrite what was saved; the revert brings back the snapshot's contents.
        for offset, length in ranges[:4]:
            os.pwrite(fd, b"\xee" * min(length, SIZE - offset), offset)
        log.close()
    finally:
        os.close(fd)
    before_image.restore(image)
    assert_reverted(image, copy)


# Three writes, each to its own chunk of data (see DATA_AT): one full record each.
THIRD_RECORD = RECORD + 2 * (RECORD + CHUNK)


def _truncate(at: int) -> Callable[[BinaryIO], object]:
    return lambda f: f.truncate(THIRD_RECORD + at)


def _flip(at: int) -> Callable[[BinaryIO], object]:
    def flip(f: BinaryIO) -> None:
        f.seek(THIRD_RECORD + at)
        byte = f.read(1)[0]
        f.seek(THIRD_RECORD + at)
        f.write(bytes([byte ^ 0xFF]))

    return flip


@pytest.mark.parametrize(
    "tear",
    [
        pytest.param(_truncate(RECORD + 1000), id="truncated-mid-payload"),
        pytest.param(_truncate(20), id="truncated-mid-header"),
        pytest.param(_flip(RECORD + 500), id="flipped-payload-byte"),
        pytest.param(_flip(10), id="flipped-offset-byte"),
        pytest.param(_flip(RECORD + CHUNK - 1), id="flipped-last-byte"),
    ],
)
def test_torn_tail_is_cut_and_what_is_valid_is_restored(
    snapshot: tuple[Path, Path], sock_dir: Path, tear: Callable[[BinaryIO], object]
) -> None:
    image, copy = snapshot
    with serving(image, sock_dir) as uri:
        qemu_io(uri, "write -P 0xa1 0 4k", "write -P 0xa2 64k 4k", "write -P 0xa3 9M 4k")
    at = THIRD_RECORD
    assert log_path(image).stat().st_size == at + RECORD + CHUNK
    with open(log_path(image), "r+b") as f:
        tear(f)

    with open(image, "rb") as disk:
        log = BeforeImageLog.open_for(image, disk.fileno())
        assert log is not None
        assert log.saved_bytes == 2 * CHUNK
        log.close()
    assert log_path(image).stat().st_size == at

    assert before_image.restore(image) == 2 * CHUNK
    with open(image, "rb") as f, open(copy, "rb") as c:
        assert f.read(9 * MiB) == c.read(9 * MiB)
        assert f.read(4096) == b"\xa3" * 4096  # its record was torn: it stays written
        c.seek(9 * MiB + 4096)
        assert f.read() == c.read()


def test_discard_while_serving_stops_preserving_and_the_export_keeps_working(
    snapshot: tuple[Path, Path], sock_dir: Path
) -> None:
    image, _ = snapshot
    with serving(image, sock_dir) as uri:
        qemu_io(uri, "write -P 0x01 0 4k")
        held = os.open(log_path(image), os.O_RDONLY)
        try:
            saved = os.fstat(held).st_size
            assert saved == RECORD + RECORD + CHUNK
            before_image.discard(image)
            before_image.discard(image)  # already gone: fine
            qemu_io(uri, "write -P 0x02 2M 1M", "write -z 9M 64k", "read -P 0x02 2M 1M")
            assert os.fstat(held).st_size == saved
        finally:
            os.close(held)
    assert not log_path(image).exists()
    assert before_image.restore(image) == 0


def test_no_log_serves_as_before(tmp_path: Path, sock_dir: Path) -> None:
    image = make_disk(tmp_path / "disk0.img")
    with serving(image, sock_dir) as uri:
        qemu_io(uri, "write -P 0x09 0 1M", "read -P 0x09 0 1M")
    assert not log_path(image).exists()
    assert before_image.restore(image) == 0


def test_restore_twice_and_after_a_second_round(snapshot: tuple[Path, Path], sock_dir: Path) -> None:
    image, copy = snapshot
    with serving(image, sock_dir) as uri:
        qemu_io(uri, "write -P 0x31 0 2M", "discard 9M 2M")
    assert before_image.restore(image) > 0
    assert_reverted(image, copy)
    assert before_image.restore(image) == 0
    assert_reverted(image, copy)
    with serving(image, sock_dir) as uri:
        qemu_io(uri, "write -P 0x32 1M 3M", "write -P 0x33 0 4k")
    assert image.read_bytes() != copy.read_bytes()
    assert before_image.restore(image) > 0
    assert_reverted(image, copy)


def test_create_replaces_the_log_and_refuses_a_bad_chunk(snapshot: tuple[Path, Path], sock_dir: Path) -> None:
    image, _ = snapshot
    with serving(image, sock_dir) as uri:
        qemu_io(uri, "write -P 0x41 0 64k")
    assert log_path(image).stat().st_size > RECORD
    before_image.create(image)
    assert log_path(image).stat().st_size == RECORD
    with pytest.raises(SiteRecoveryError) as err:
        before_image.create(image, chunk=1000)
    assert err.value.first.code == "invalid-input"


def test_a_log_without_a_valid_header_is_refused(snapshot: tuple[Path, Path], sock_dir: Path) -> None:
    image, _ = snapshot
    log_path(image).write_bytes(b"not a before-image log at all")
    with pytest.raises(SiteRecoveryError) as err, serving(image, sock_dir):
        pass
    assert err.value.first.code == "before-image-invalid"


def _export_process(image: Path, sock_dir: Path) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "siterecovery.lab.export",
            "--unix-dir",
            str(sock_dir),
            "--disk",
            f"L={image}",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.startswith("serving"), line
    return proc


def _storm(tool: str, uri: str) -> list[str]:
    if tool == "fio":
        return [
            require_tool("fio"),
            "--name=storm",
            "--ioengine=nbd",
            f"--uri={uri}",
            "--rw=randwrite",
            "--bsrange=4k-256k",
            "--iodepth=8",
            "--size=32M",
            "--loops=100",
        ]
    commands = [
        f"aio_write -P {i % 250 + 1} {(i * 7919 * 4096) % (SIZE - MiB)} {4096 * (1 + i % 40)}"
        for i in range(4000)
    ]
    args = [require_tool("qemu-io"), "-f", "raw", uri]
    for command in commands:
        args += ["-c", command]
    return args


@pytest.mark.parametrize(
    "tool", [pytest.param("fio", id="fio-randwrite"), pytest.param("qemu-io", id="qemu-io-aio")]
)
def test_kill_9_of_the_export_mid_storm_then_revert(tmp_path: Path, sock_dir: Path, tool: str) -> None:
    # Data everywhere but one hole: every chunk first written costs a full record.
    image = tmp_path / "disk0.img"
    with open(image, "wb") as f:
        f.write(os.urandom(SIZE))
    punch_or_zero_file(image, 20 * MiB, 3 * MiB)
    before_image.create(image)
    copy = tmp_path / "snapshot.img"
    run("cp", "--sparse=always", str(image), str(copy))
    export = _export_process(image, sock_dir)
    storm: subprocess.Popen[bytes] | None = None
    try:
        uri = f"nbd+unix:///L?socket={sock_dir / 'L.sock'}"
        storm = subprocess.Popen(_storm(tool, uri), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        # Kill once a good part of the disk has been overwritten, while writes still arrive.
        deadline = time.monotonic() + 60
        while (
            log_path(image).stat().st_size < 8 * MiB and storm.poll() is None and time.monotonic() < deadline
        ):
            time.sleep(0.01)
        assert storm.poll() is None, "the storm ended before the export was killed"
        export.send_signal(signal.SIGKILL)
        export.wait(timeout=30)
    finally:
        for proc in (export, storm):
            if proc is not None and proc.poll() is None:
                proc.kill()
            if proc is not None:
                proc.wait(timeout=30)
        if export.stdout is not None:
            export.stdout.close()
    assert image.read_bytes() != copy.read_bytes()

    assert before_image.restore(image) >= 8 * MiB - CHUNK

    assert_reverted(image, copy)
