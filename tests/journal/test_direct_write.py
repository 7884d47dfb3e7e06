"""Long aligned runs go to the replica with O_DIRECT; refusals fall back to buffered writes."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from siterecovery.dataplane.apply import DirectApplier
from siterecovery.dataplane.direct_write import ALIGN, DIRECT_MIN, POOL, STAGING, DirectWriter, aligned
from tests.journal.conftest import OpenDisk
from tests.journal.crash_child import resident_bytes


def test_long_runs_skip_the_page_cache_short_ones_do_not(open_disk: OpenDisk, tmp_path: Path) -> None:
    disk = open_disk(drop_batch=1 << 40)  # never dropped: only a direct write keeps pages out
    big = os.urandom(STAGING + DIRECT_MIN)  # more than one staging buffer, in two frames
    half = len(big) // 2
    disk.apply_write(0, 0, memoryview(big)[:half])
    disk.apply_write(1, half, memoryview(big)[half:])
    small = os.urandom(ALIGN)
    disk.apply_write(2, 8 * DIRECT_MIN, memoryview(small))
    disk.sync()
    image = tmp_path / "disk.img"
    assert resident_bytes(image) == ALIGN  # the short write's page only
    with open(image, "rb") as f:
        assert f.read(len(big)) == big
        f.seek(8 * DIRECT_MIN)
        assert f.read(ALIGN) == small


def test_owned_pooled_buffers_are_written_from_where_they_are_then_recycled(
    open_disk: OpenDisk, tmp_path: Path
) -> None:
    disk = open_disk(drop_batch=1 << 40)
    first, second, again = POOL.take(), POOL.take(), POOL.take()
    assert aligned(first) and not aligned(bytearray(ALIGN + 1))
    kept = first.obj, second.obj
    first[:] = os.urandom(len(first))
    second[:] = os.urandom(len(second))
    again[:] = os.urandom(len(again))
    expected = bytes(again) + bytes(second)
    disk.apply_write(0, 0, first, owned=True)
    disk.apply_write(1, len(first), second, owned=True)
    disk.apply_write(2, 0, again, owned=True)  # overlaps a held buffer: merged into it
    with pytest.raises(ValueError):
        bytes(again)  # copied into the held buffer, its own went back to the pool at once
    disk.sync()
    image = tmp_path / "disk.img"
    assert resident_bytes(image) == 0  # written direct, from the pooled buffers themselves
    with open(image, "rb") as f:
        assert f.read(len(expected)) == expected
    # Written, they went back to the pool: the caller's views are released, the next take reuses them.
    with pytest.raises(ValueError):
        bytes(first)
    assert {id(POOL.take().obj), id(POOL.take().obj)} == {id(m) for m in kept}


def test_held_pooled_buffers_merged_into_a_copy_go_back_to_the_pool(
    open_disk: OpenDisk, tmp_path: Path
) -> None:
    disk = open_disk(drop_batch=1 << 40)
    first, second, across = POOL.take(), POOL.take(), POOL.take()
    for buf in (first, second, across):
        buf[:] = os.urandom(len(buf))
    size = len(first)
    expected = bytes(first[: size // 2]) + bytes(across) + bytes(second[size // 2 :])
    disk.apply_write(0, 0, first, owned=True)
    disk.apply_write(1, size, second, owned=True)
    # Across both held buffers: the three are merged into one copy and all go back to the pool
    # (before, the two held ones were dropped, and the pool made fresh ones instead).
    disk.apply_write(2, size // 2, across, owned=True)
    for view in (first, second, across):
        with pytest.raises(ValueError):
            bytes(view)
    disk.sync()
    with open(tmp_path / "disk.img", "rb") as f:
        assert f.read(len(expected)) == expected


def test_a_refused_direct_write_leaves_the_run_to_the_buffered_path(tmp_path: Path) -> None:
    path = tmp_path / "replica.img"
    path.write_bytes(bytes(4 * DIRECT_MIN))
    writer = DirectWriter(path)
    try:
        assert writer.fits(0, DIRECT_MIN)
        # The kernel refuses an unaligned O_DIRECT offset (EINVAL): the writer steps aside.
        assert not writer.write([bytearray(DIRECT_MIN)], 1)
        assert not writer.fits(0, DIRECT_MIN)
    finally:
        writer.close()


def test_the_applier_without_a_journal_writes_long_runs_direct(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    target = tmp_path / "replica.img"
    applier = DirectApplier("p", target, 4 * DIRECT_MIN, state)
    try:
        data = os.urandom(DIRECT_MIN)
        applier.apply_write(0, DIRECT_MIN, memoryview(data))
        applier.apply_write(1, 3 * DIRECT_MIN, memoryview(data[:ALIGN]))
        applier.sync()
    finally:
        applier.close()
    assert resident_bytes(target) == ALIGN
    with open(target, "rb") as f:
        f.seek(DIRECT_MIN)
        assert f.read(DIRECT_MIN) == data
        f.seek(3 * DIRECT_MIN)
        assert f.read(ALIGN) == data[:ALIGN]
