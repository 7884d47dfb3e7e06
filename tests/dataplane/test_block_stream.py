"""The resync's digest stream and comparisons, against the plain hasher and brute force."""

from __future__ import annotations

import base64
import os
import random
from pathlib import Path

import pytest

from siterecovery.dataplane.blocks import (
    DIGEST_SIZE,
    BlockHasher,
    BlockStream,
    StreamClosed,
    answer_for,
    differing_runs,
)

COARSE, FINE = 64 << 10, 4096
PER = COARSE // FINE


def _image(path: Path) -> int:
    """Data, a hole, an all-zero written block and a last block cut short."""
    size = 9 * COARSE + 3 * FINE
    with open(path, "wb") as f:
        f.truncate(size)
        for block in (0, 1, 4, 7):
            f.seek(block * COARSE)
            f.write(os.urandom(COARSE))
        f.seek(5 * COARSE)
        f.write(bytes(COARSE))  # allocated, reads as zeroes
        f.seek(9 * COARSE)
        f.write(os.urandom(3 * FINE))
    return size


def test_stream_digests_equal_the_hashers(tmp_path: Path) -> None:
    path = tmp_path / "disk.img"
    size = _image(path)
    plain = BlockHasher(path, size, COARSE, FINE)
    coarse = plain.coarse_digests()
    stream = BlockStream(path, size, COARSE, FINE, workers=3, ahead=2, claim=1)
    try:
        for idx in range(plain.nblocks):
            got_coarse, got_fines = stream.take(idx, timeout=30)
            assert got_coarse == coarse[idx * DIGEST_SIZE : (idx + 1) * DIGEST_SIZE], idx
            assert got_fines == plain.fine_digests(idx), idx
        with pytest.raises(ValueError):
            stream.take(0, timeout=1)  # already taken
    finally:
        stream.close()


def test_stream_skips_and_closes(tmp_path: Path) -> None:
    path = tmp_path / "disk.img"
    size = _image(path)
    stream = BlockStream(path, size, COARSE, FINE, first=2, ahead=1, claim=1)
    assert (
        stream.take(7, timeout=30)[0]
        == BlockHasher(path, size, COARSE, FINE).coarse_digests()[7 * DIGEST_SIZE : 8 * DIGEST_SIZE]
    )
    stream.close()
    with pytest.raises(StreamClosed):  # at most one block past the consumer was hashed
        stream.take(9, timeout=30)


def _brute(local: bytes, remote: bytes) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for i in range(len(local) // DIGEST_SIZE):
        if local[i * DIGEST_SIZE : (i + 1) * DIGEST_SIZE] != remote[i * DIGEST_SIZE : (i + 1) * DIGEST_SIZE]:
            if out and out[-1][1] == i:
                out[-1] = (out[-1][0], i + 1)
            else:
                out.append((i, i + 1))
    return out


@pytest.mark.parametrize("seed", range(20))
def test_differing_runs_match_brute_force(seed: int) -> None:
    rng = random.Random(seed)
    count = rng.choice([1, 15, 16, 17, 256, 300])
    local = bytearray(rng.randbytes(count * DIGEST_SIZE))
    remote = bytearray(local)
    for _ in range(rng.randrange(0, 12)):
        start = rng.randrange(count)
        for i in range(start, min(count, start + rng.randrange(1, 40))):
            remote[i * DIGEST_SIZE] ^= 0xFF
    assert list(differing_runs(bytes(local), bytes(remote))) == _brute(bytes(local), bytes(remote))


def test_answer_sends_fine_digests_only_where_the_coarse_ones_differ(tmp_path: Path) -> None:
    path = tmp_path / "disk.img"
    size = _image(path)
    coarse = BlockHasher(path, size, COARSE, FINE).coarse_digests()
    have = bytearray(coarse[: 4 * DIGEST_SIZE])
    have[2 * DIGEST_SIZE] ^= 1  # the peer's block 2 differs
    stream = BlockStream(path, size, COARSE, FINE)
    try:
        answer = answer_for(stream, [0, 1, 2, 3], base64.b64encode(have).decode(), timeout=30)
        assert len(answer) == 4 * DIGEST_SIZE + PER * DIGEST_SIZE
        assert answer[: 3 * DIGEST_SIZE] == coarse[: 3 * DIGEST_SIZE]
        with pytest.raises(ValueError):  # digests and blocks must pair up, blocks ascending
            answer_for(stream, [5, 4], base64.b64encode(bytes(2 * DIGEST_SIZE)).decode(), timeout=1)
        with pytest.raises(ValueError):
            answer_for(stream, [6], base64.b64encode(bytes(DIGEST_SIZE - 1)).decode(), timeout=1)
    finally:
        stream.close()
