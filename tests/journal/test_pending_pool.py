"""The journal's pending writes reuse drained buffers (issue 16): the bytes stay right."""

from __future__ import annotations

import os
from pathlib import Path

from siterecovery.dataplane.journal.ranges import POOL_MIN, _Pending

MiB = 1 << 20


def test_drained_buffers_are_reused_and_hold_the_new_bytes(tmp_path: Path) -> None:
    target = tmp_path / "disk.img"
    fd = os.open(target, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        pending = _Pending()
        first = [os.urandom(MiB) for _ in range(3)]
        for i, data in enumerate(first):
            pending.add(i * MiB, memoryview(data))
        held = [id(b) for b in pending.bufs]
        pending.drain(fd)
        second = [os.urandom(MiB) for _ in range(3)]
        for i, data in enumerate(second):
            pending.add((3 + i) * MiB, memoryview(data))
        assert sorted(id(b) for b in pending.bufs) == sorted(held)  # no new buffers
        small = os.urandom(POOL_MIN // 2)
        pending.add(6 * MiB, memoryview(small))  # not pooled, and not given a pooled buffer
        seen = bytearray(4 * MiB)
        pending.overlay(3 * MiB, memoryview(seen))
        assert bytes(seen) == b"".join(second) + small + bytes(MiB - len(small))
        pending.drain(fd)
        assert os.pread(fd, 7 * MiB, 0)[: 6 * MiB + len(small)] == b"".join(first + second) + small
    finally:
        os.close(fd)
