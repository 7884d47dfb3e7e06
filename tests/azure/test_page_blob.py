"""Replica disks as page blobs on Azurite: the writer's alignment, merging, limits and clearing, and the
master target applying a replicated disk to a page blob through its real process."""

from __future__ import annotations

import os
import subprocess

import pytest
import xxhash
from azure.storage.blob import BlobClient

from siterecovery.dataplane.page_blob import CONNECTION_ENV, PageBlobWriter, blob_name
from tests.azure.conftest import Azurite
from tests.conftest import require_tool
from tests.dataplane.conftest import Plane, make_image, one_pair, wait_for, wait_replicated

KiB, MiB = 1 << 10, 1 << 20


def _digest(data: bytes | bytearray) -> str:
    return xxhash.xxh3_128_hexdigest(data)


def _pages(blob: BlobClient) -> list[tuple[int, int]]:
    return [(int(p.start or 0), int(p.end or 0) + 1) for p in blob.list_page_ranges()]


def test_writer_merges_aligns_splits_and_clears(azurite: Azurite) -> None:
    blob = azurite.container().get_blob_client("disk0.vhd")
    size = 16 * MiB
    model = bytearray(size)
    writer = PageBlobWriter(blob, size)

    # A full sync's 64 KiB frames, adjacent: merged into 4 MiB Put Page calls.
    for off in range(0, 8 * MiB, 64 * KiB):
        chunk = os.urandom(64 * KiB)
        writer.write(off, chunk)
        model[off : off + len(chunk)] = chunk
    writer.flush()
    assert writer.requests == 2

    # One 6 MiB write is split at the service's 4 MiB limit.
    big = os.urandom(6 * MiB)
    writer.write(9 * MiB, big)
    model[9 * MiB : 15 * MiB] = big
    writer.flush()
    assert writer.requests == 4

    # Unaligned writes and zero ranges complete their edge pages from the blob.
    odd = os.urandom(1000)
    writer.write(9 * MiB + 100, odd)
    model[9 * MiB + 100 : 9 * MiB + 1100] = odd
    writer.zero(9 * MiB + 50_000, 3000)
    model[9 * MiB + 50_000 : 9 * MiB + 53_000] = bytes(3000)
    # An aligned zero range is cleared (no pages left), not written with zeroes.
    writer.zero(2 * MiB, 1 * MiB)
    model[2 * MiB : 3 * MiB] = bytes(1 * MiB)
    writer.flush()

    assert _digest(blob.download_blob(offset=0, length=size).readall()) == _digest(model)
    assert not any(lo < 3 * MiB and hi > 2 * MiB for lo, hi in _pages(blob))
    # The disk is followed by a fixed-VHD footer (what Azure imports managed disks from).
    assert blob.get_blob_properties().size == size + 512
    assert blob.download_blob(offset=size, length=8).readall() == b"conectix"
    # A reopened writer keeps the blob as it is.
    before = blob.download_blob().readall()
    assert PageBlobWriter(blob, size).size == size
    assert blob.download_blob().readall() == before


def test_master_target_writes_the_replica_into_a_page_blob(
    azurite: Azurite, plane: Plane, monkeypatch: pytest.MonkeyPatch
) -> None:
    """MT-1 on the Azure side: agent → process server → master target (`--page-blob-container`)."""
    qemu_io = require_tool("qemu-io")
    size = 16 * MiB
    container = azurite.container("replicas")
    src = make_image(plane.root / "src.img", size, [(1 * MiB, 2 * MiB, 0xAB), (7 * MiB, 512 * KiB, 0x11)])
    monkeypatch.setenv(CONNECTION_ENV, azurite.connection_string)
    mt, _, agent = one_pair(
        plane, src, plane.root / "p1.vhd", size, "--page-blob-container", container.container_name
    )
    sock = plane.root / "nbd" / "d0.sock"
    wait_for(sock.exists, 60, "the NBD export")
    subprocess.run(
        [
            qemu_io,
            "-f",
            "raw",
            "-c",
            "write -P 0x5a 4M 1M",
            "-c",
            "write -P 0x33 9M 64k",
            "-c",
            "write -z 1M 512k",
            "-c",
            "write -P 0x77 12M 1536",
            "-c",
            "flush",
            f"nbd+unix:///d0?socket={sock}",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    wait_replicated(agent, mt, "p1")  # type: ignore[arg-type]
    assert not (plane.root / "p1.vhd").exists()  # nothing went to a local image
    # The blob is a fixed VHD of the source's bytes: qemu-img reads it back (size from the footer).
    blob = container.get_blob_client(blob_name(plane.root / "p1.vhd"))
    assert blob.get_blob_properties().size == size + 512
    replica = plane.root / "replica.vhd"
    replica.write_bytes(blob.download_blob().readall())
    result = subprocess.run(
        [
            require_tool("qemu-img"),
            "compare",
            "--image-opts",
            f"driver=vpc,force_size_calc=current_size,file.filename={replica}",
            f"driver=raw,file.filename={src}",
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr
