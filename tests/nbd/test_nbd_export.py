"""The agent's NBD export against real NBD peers: nbdinfo, qemu-io, qemu-img, nbdcopy, fio."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import struct
import subprocess
import threading
import time
from pathlib import Path

import pytest

from siterecovery.dataplane.nbd.image import Export
from siterecovery.dataplane.nbd.server import NbdServer
from siterecovery.dataplane.nbd.wire import (
    MAX_BLOCK_SIZE,
    REQUEST,
    REQUEST_MAGIC,
    SIMPLE_REPLY,
    SIMPLE_REPLY_MAGIC,
    Cmd,
    CmdFlag,
    NbdErrno,
)
from siterecovery.dataplane.nbd_client import NbdClient, NbdError
from siterecovery.errors import SiteRecoveryError
from tests.conftest import require_tool
from tests.nbd.conftest import IMAGE_SIZE, Served, make_image

MiB = 1024 * 1024


def run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{args[0]} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return proc


def test_nbdinfo_reports_size_and_lists_export_names(served: Served) -> None:
    nbdinfo = require_tool("nbdinfo")
    assert run(nbdinfo, "--size", served.uri()).stdout.strip() == str(IMAGE_SIZE)
    listing = json.loads(run(nbdinfo, "--list", "--json", served.uri("")).stdout)
    exports = {e["export-name"]: e for e in listing["exports"]}
    assert set(exports) == {"disk0", "disk1"}
    assert exports["disk1"]["export-size"] == 16 * MiB
    assert exports["disk1"]["is_read_only"] is True
    disk0 = exports["disk0"]
    assert (disk0["can_flush"], disk0["can_fua"], disk0["can_trim"], disk0["can_zero"]) == (True,) * 4
    assert disk0["can_multi_conn"] is True
    assert (disk0["block_size_minimum"], disk0["block_size_preferred"], disk0["block_size_maximum"]) == (
        512,
        4096,
        32 * MiB,
    )
    assert disk0["contexts"] == ["base:allocation"]


def test_nbdinfo_over_tcp(served: Served) -> None:
    nbdinfo = require_tool("nbdinfo")
    out = run(nbdinfo, "--size", f"nbd://127.0.0.1:{served.tcp_port}/disk1").stdout
    assert out.strip() == str(16 * MiB)


@pytest.mark.parametrize(
    ("pattern", "offset", "length"),
    [
        pytest.param(0xAB, 0, MiB, id="aligned-1m"),
        pytest.param(0xCD, 1000, 3000, id="unaligned-read-modify-write"),
        pytest.param(0x5A, IMAGE_SIZE - 4096, 4096, id="last-block"),
    ],
)
def test_qemu_io_writes_patterns_and_reads_them_back(
    served: Served, pattern: int, offset: int, length: int
) -> None:
    qemu_io = require_tool("qemu-io")
    run(
        qemu_io,
        "-f",
        "raw",
        served.uri(),
        "-c",
        f"write -P {pattern:#x} {offset} {length}",
        "-c",
        f"read -P {pattern:#x} {offset} {length}",
    )
    with open(served.image, "rb") as f:
        f.seek(offset)
        assert f.read(length) == bytes([pattern]) * length
    # A different pattern must fail verification, so the read really checks the bytes.
    wrong = subprocess.run(
        [qemu_io, "-f", "raw", served.uri(), "-c", f"read -P {pattern ^ 0xFF:#x} {offset} {length}"],
        capture_output=True,
        text=True,
    )
    assert wrong.returncode != 0 and "verification failed" in wrong.stdout


def test_qemu_img_compare_image_against_export(served: Served) -> None:
    qemu_io, qemu_img = require_tool("qemu-io"), require_tool("qemu-img")
    run(qemu_io, "-f", "raw", served.uri(), "-c", "write -P 0x42 8M 3M", "-c", "write -P 0x17 40M 512")
    run(qemu_img, "compare", "-f", "raw", "-F", "raw", str(served.image), served.uri())


def test_nbdcopy_random_image_then_compare(served: Served, tmp_path: Path) -> None:
    nbdcopy, qemu_img = require_tool("nbdcopy"), require_tool("qemu-img")
    source = tmp_path / "random.img"
    with open(source, "wb") as f:
        f.write(os.urandom(32 * MiB))
        f.truncate(IMAGE_SIZE)
    run(nbdcopy, str(source), served.uri())
    run(qemu_img, "compare", "-f", "raw", "-F", "raw", str(source), served.uri())
    assert source.read_bytes() == served.image.read_bytes()


@pytest.mark.parametrize(
    ("cmd", "flags", "offset", "length", "expected"),
    [
        pytest.param(Cmd.READ, 0, IMAGE_SIZE - 512, 1024, NbdErrno.EINVAL, id="read-past-end"),
        pytest.param(Cmd.WRITE, 0, IMAGE_SIZE, 512, NbdErrno.ENOSPC, id="write-past-end"),
        pytest.param(Cmd.WRITE, 0, 100, 512, NbdErrno.EINVAL, id="write-unaligned-offset"),
        pytest.param(Cmd.READ, 0, 0, 100, NbdErrno.EINVAL, id="read-unaligned-length"),
        pytest.param(Cmd.WRITE, 0, 0, MAX_BLOCK_SIZE + 512, NbdErrno.EINVAL, id="write-over-max-block"),
        pytest.param(Cmd.WRITE_ZEROES, 0, IMAGE_SIZE - 512, 4096, NbdErrno.ENOSPC, id="zero-past-end"),
        pytest.param(Cmd.TRIM, 0, 512, 3, NbdErrno.EINVAL, id="trim-unaligned"),
        pytest.param(Cmd.READ, CmdFlag.FUA, 0, 512, NbdErrno.EINVAL, id="flag-not-for-command"),
        pytest.param(Cmd.CACHE, 0, 0, 512, NbdErrno.EINVAL, id="unsupported-command"),
        pytest.param(Cmd.BLOCK_STATUS, 0, 0, 512, NbdErrno.EINVAL, id="block-status-not-negotiated"),
    ],
)
def test_bad_requests_get_nbd_errors_and_the_connection_stays_up(
    served: Served, cmd: Cmd, flags: int, offset: int, length: int, expected: NbdErrno
) -> None:
    # Simple replies throughout (and no block status negotiated), as an old client would get.
    with NbdClient.connect("disk0", unix=served.socket, structured=False) as client:
        client.pwrite(b"\x77" * 4096, 0)
        client._cookie += 1
        header = REQUEST.pack(REQUEST_MAGIC, flags, cmd, client._cookie, offset, length)
        payload = b"\x99" * length if cmd == Cmd.WRITE else b""
        client._sock.sendall(header + payload)
        with pytest.raises(NbdError) as err:
            client._check_reply(cmd, offset, length)
        assert err.value.errno == expected
        assert err.value.first.code == "nbd-request-failed"
        # Same connection, next request: served, and nothing of the refused payload was written.
        assert client.pread(4096, 0) == b"\x77" * 4096
    assert served.image.read_bytes().count(0x99) == 0


def test_client_errors_for_out_of_range_and_unaligned(served: Served) -> None:
    with NbdClient.connect("disk0", unix=served.socket) as client:
        with pytest.raises(NbdError) as err:
            client.pwrite(b"x" * 512, IMAGE_SIZE)
        assert err.value.errno == NbdErrno.ENOSPC
        with pytest.raises(NbdError) as err:
            client.pread(10, 3)
        assert err.value.errno == NbdErrno.EINVAL
        client.pwrite(b"y" * 512, 512)
        assert client.pread(512, 512) == b"y" * 512


def test_read_only_export_refuses_writes(served: Served) -> None:
    with NbdClient.connect("disk1", unix=served.socket) as client:
        assert client.read_only
        with pytest.raises(NbdError) as err:
            client.pwrite(b"z" * 512, 0)
        assert err.value.errno == NbdErrno.EPERM
        assert client.pread(512, 0) == bytes(512)


def test_broken_framing_closes_only_that_connection(served: Served) -> None:
    with NbdClient.connect("disk0", unix=served.socket) as client:
        client._sock.sendall(struct.pack(">IHHQQI", 0xDEADBEEF, 0, 0, 1, 0, 512))
        assert client._sock.recv(16) == b""
    with NbdClient.connect("disk0", unix=served.socket) as again:
        assert again.pread(512, 0) == bytes(512)


def test_unknown_export_is_refused_in_the_handshake(served: Served) -> None:
    with pytest.raises(NbdError) as err:
        NbdClient.connect("nope", unix=served.socket)
    assert err.value.first.code == "nbd-export-unknown"


def test_recording_sink_sees_every_write_in_order(served: Served, tmp_path: Path) -> None:
    qemu_io = require_tool("qemu-io")
    run(
        qemu_io,
        "-f",
        "raw",
        served.uri(),
        "-c",
        "write -P 0x01 0 64k",
        "-c",
        "write -P 0x02 32k 64k",
        "-c",
        "write -P 0x03 1000 100",
        "-c",
        "write -z -u 0 8k",
        "-c",
        "flush",
    )
    with NbdClient.connect("disk0", unix=served.socket) as client:
        client.pwrite(b"\x04" * 4096, 4096, fua=True)
        client.zero(1 * MiB, 4096)
        client.trim(2 * MiB, 4096)
    records = served.sink.records
    assert [r[0] for r in records] == list(range(1, len(records) + 1))
    assert [(kind, offset) for _, kind, offset, _ in records] == [
        ("write", 0),
        ("write", 32 * 1024),
        ("write", 512),  # qemu read-modify-writes the unaligned 100 bytes as the two sectors around them
        ("zero", 0),
        ("write", 4096),
        ("zero", MiB),
        ("zero", 2 * MiB),
    ]
    assert served.sink.flushes >= 2  # the FLUSH and the FUA write
    replayed = tmp_path / "replayed.img"
    served.sink.replay(replayed, IMAGE_SIZE)
    assert replayed.read_bytes() == served.image.read_bytes()


def test_zero_and_trim_keep_the_image_sparse(served: Served) -> None:
    def allocated() -> int:
        return os.stat(served.image).st_blocks * 512

    with NbdClient.connect("disk0", unix=served.socket) as client:
        client.pwrite(os.urandom(8 * MiB), 0)
        assert allocated() >= 8 * MiB
        client.zero(0, 4 * MiB)
        assert allocated() <= 4 * MiB + 64 * 1024
        client.trim(4 * MiB, 2 * MiB)
        assert allocated() <= 2 * MiB + 64 * 1024
        client.pwrite(bytes(2 * MiB), 6 * MiB)  # a write of zeroes becomes a hole too
        assert allocated() <= 64 * 1024
        client.zero(16 * MiB, MiB, punch=False)  # NO_HOLE: zeroes stay allocated
        assert allocated() >= MiB
        assert client.pread(8 * MiB, 0) == bytes(8 * MiB)
    kinds = [r[1] for r in served.sink.records]
    assert kinds == ["write", "zero", "zero", "zero", "zero"]


def test_block_status_map_matches_the_image(served: Served) -> None:
    nbdinfo = require_tool("nbdinfo")
    with NbdClient.connect("disk0", unix=served.socket) as client:
        client.pwrite(os.urandom(MiB), 4 * MiB)
        client.pwrite(os.urandom(64 * 1024), 10 * MiB)
    extents = json.loads(run(nbdinfo, "--map", "--json", served.uri()).stdout)
    data = [(e["offset"], e["length"]) for e in extents if e["type"] == 0]
    assert data == [(4 * MiB, MiB), (10 * MiB, 64 * 1024)]
    holes = [e for e in extents if e["type"] == 3]
    assert sum(e["length"] for e in holes) == IMAGE_SIZE - MiB - 64 * 1024


def test_concurrent_clients_write_and_read_back(served: Served, tmp_path: Path) -> None:
    errors: list[BaseException] = []

    def worker(n: int) -> None:
        try:
            with NbdClient.connect("disk0", unix=served.socket) as client:
                for i in range(32):
                    offset = (n * 32 + i) * 64 * 1024
                    block = bytes([n + 1]) * 64 * 1024
                    client.pwrite(block, offset)
                    assert client.pread(len(block), offset) == block
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(served.sink.records) == 4 * 32
    replayed = tmp_path / "replayed.img"
    served.sink.replay(replayed, IMAGE_SIZE)
    assert replayed.read_bytes() == served.image.read_bytes()


def test_nbd_client_round_trips_over_tcp(served: Served) -> None:
    with NbdClient.connect("disk0", host="127.0.0.1", port=served.tcp_port) as client:
        assert client.size == IMAGE_SIZE
        assert (client.min_block_size, client.max_block_size) == (512, 32 * MiB)
        data = os.urandom(40 * MiB)  # larger than one request: the client splits it
        client.pwrite(data, 512)
        client.flush()
        assert client.pread(len(data), 512) == data
    with open(served.image, "rb") as f:
        f.seek(512)
        assert f.read(len(data)) == data


def test_fio_nbd_engine_writes_and_verifies(served: Served) -> None:
    fio = require_tool("fio")
    run(
        fio,
        "--name=verify",
        "--ioengine=nbd",
        f"--uri={served.uri()}",
        "--rw=randwrite",
        "--bs=4k",
        "--iodepth=16",
        "--size=4M",
        "--verify=crc32c",
        "--verify_state_save=0",
        "--output-format=json",
    )
    assert sum(1 for r in served.sink.records if r[1] == "write") >= 1024


@pytest.mark.parametrize(
    "export",
    [
        pytest.param(lambda p: Export("d", p, IMAGE_SIZE + 512), id="size-differs-from-image"),
        pytest.param(lambda p: Export("d", p.with_name("missing.img"), IMAGE_SIZE), id="image-missing"),
        pytest.param(lambda p: Export("d", p, IMAGE_SIZE, min_block_size=3), id="bad-min-block-size"),
    ],
)
def test_invalid_exports_are_refused_at_start(tmp_path: Path, export: object) -> None:
    image = make_image(tmp_path / "d.img")
    server = NbdServer([export(image)], tcp=("127.0.0.1", 0))  # type: ignore[operator]
    with pytest.raises(SiteRecoveryError) as err:
        asyncio.run(server.start())
    assert err.value.first.code == "nbd-export-invalid"


def test_disconnect_in_mid_request_leaves_the_server_serving(served: Served) -> None:
    with socket.socket(socket.AF_UNIX) as raw:
        raw.connect(str(served.socket))
        raw.recv(18)
        raw.sendall(b"\x00\x00\x00\x03" + struct.pack(">QII", 0x49484156454F5054, 3, 0))
        raw.sendall(b"half an option")
    with NbdClient.connect("disk0", unix=served.socket) as client:
        client.pwrite(b"\x01" * 512, 0)
        assert client.pread(512, 0) == b"\x01" * 512


def test_pipelined_reads_with_a_slow_reader_all_come_back(served: Served) -> None:
    """The server stops taking requests while the client is not reading replies, then resumes."""
    content = os.urandom(16 * MiB)
    served.image.write_bytes(content + bytes(IMAGE_SIZE - len(content)))
    count = 96
    with NbdClient.connect("disk0", unix=served.socket, structured=False) as client:  # simple replies

        def send() -> None:
            for i in range(count):
                client._sock.sendall(REQUEST.pack(REQUEST_MAGIC, 0, Cmd.READ, i, (i % 16) * MiB, MiB))

        sender = threading.Thread(target=send)
        sender.start()
        # Let the replies pile up past the transport's high-water mark before reading any.
        time.sleep(0.5)
        header, block = bytearray(16), bytearray(MiB)
        for i in range(count):
            client._recv_into(memoryview(header))
            assert SIMPLE_REPLY.unpack(header) == (SIMPLE_REPLY_MAGIC, 0, i)
            client._recv_into(memoryview(block))
            assert block == content[(i % 16) * MiB : (i % 16 + 1) * MiB]
        sender.join()
        client._cookie = count
        assert client.pread(512, 0) == content[:512]
