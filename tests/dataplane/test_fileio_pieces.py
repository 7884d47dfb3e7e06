"""`fileio.pwrite_pieces`, the export's image writes: every byte lands where it belongs, and no
single write hands the kernel more than `WRITE_PIECE` bytes (a larger one would leave a large folio
in the page cache for every later 4 KiB write into it to walk)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from siterecovery.dataplane import fileio
from siterecovery.dataplane.fileio import WRITE_PIECE, pwrite_pieces


@pytest.mark.parametrize("n", [512, 4096, WRITE_PIECE, WRITE_PIECE + 512, (1 << 20) + 4096 + 7])
def test_pieces_write_every_byte_in_writes_of_at_most_a_piece(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, n: int
) -> None:
    sizes: list[int] = []
    real_pwrite = os.pwrite

    def counting_pwrite(fd: int, data: memoryview, offset: int) -> int:
        sizes.append(len(data))
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(fileio.os, "pwrite", counting_pwrite)
    payload = os.urandom(n)
    path = tmp_path / "img"
    path.write_bytes(b"\xff" * (n + 8192))
    fd = os.open(path, os.O_RDWR)
    try:
        pwrite_pieces(fd, memoryview(payload), 4096)
    finally:
        os.close(fd)
    raw = path.read_bytes()
    assert raw[:4096] == b"\xff" * 4096 and raw[4096 : 4096 + n] == payload
    assert raw[4096 + n :] == b"\xff" * 4096
    assert sum(sizes) == n and max(sizes) <= WRITE_PIECE
    assert len(sizes) == -(-n // WRITE_PIECE)
