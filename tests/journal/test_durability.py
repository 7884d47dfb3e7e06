"""Crash safety, idempotence, torn tails, full retention volumes and pruning of the journal."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from siterecovery.dataplane.points import CrashPointPolicy, PointKind
from siterecovery.errors import SiteRecoveryError
from tests.conftest import ROOT
from tests.journal import crash_child
from tests.journal.conftest import Clock, OpenDisk
from tests.journal.workload import Feeder, Guest


def _last_segment(journal: Path) -> Path:
    return max(journal.glob("seg-*.jnl"))


@pytest.mark.parametrize(
    "mode",
    [
        pytest.param("journal-buffered", id="journal-buffered"),
        pytest.param("journal-written-disk-not", id="journal-written-disk-not"),
        pytest.param("journal-and-disk-written", id="journal-and-disk-written"),
        # 1 MiB runs written with O_DIRECT before the crash, undone on open (`direct_write.py`).
        pytest.param("direct-written", id="direct-written"),
    ],
)
def test_kill_9_between_journal_and_disk_loses_nothing_acknowledged(
    mode: str, tmp_path: Path, open_disk: OpenDisk, clock: Clock
) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "tests.journal.crash_child", str(tmp_path), mode],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    guest, committed = crash_child.build(mode)

    clock.now = crash_child.CLOCK
    disk = open_disk(pending_limit=crash_child.pending_limit(mode))
    # Exactly the acknowledged state: the unacknowledged tail was undone and cut off.
    assert disk.applied_seq == committed
    assert (tmp_path / "disk.img").read_bytes() == guest.model_at(committed)
    app = [p for p in disk.points() if p.kind is PointKind.APP]
    assert [p.tag for p in app] == ["before-crash"]

    # The sender resends everything after the acknowledged sequence; history stays exact.
    feeder = Feeder(disk, guest)
    feeder.resend_after(disk.applied_seq)
    feeder.feed()
    disk.sync()
    assert (tmp_path / "disk.img").read_bytes() == guest.model_at(guest.seq)
    disk.materialise_copy(app[0], tmp_path / "copy.img")
    assert (tmp_path / "copy.img").read_bytes() == guest.model_at(committed)


def test_kill_9_during_an_in_place_rollback_resumes_it_on_open(
    tmp_path: Path, open_disk: OpenDisk, clock: Clock
) -> None:
    child = subprocess.Popen(
        [sys.executable, "-m", "tests.journal.crash_child", str(tmp_path), "rollback"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline() == "rolling back\n"
        redo = tmp_path / "disk-journal" / "redo.jnl"
        while (
            redo.stat().st_size < 4 << 20 and child.poll() is None
        ):  # part of the move is done: redo saved, disk changed
            time.sleep(0.01)
        child.kill()
        out, _ = child.communicate(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert child.returncode == -signal.SIGKILL and "done" not in out
    guest = crash_child.rollback_guest()
    _, point_seq = crash_child.build("journal-buffered")

    clock.now = crash_child.CLOCK
    disk = open_disk()  # finishes the interrupted move
    assert disk.position_seq == point_seq
    assert (tmp_path / "disk.img").read_bytes() == guest.model_at(point_seq)
    disk.roll_forward_to(disk.latest_point())
    assert (tmp_path / "disk.img").read_bytes() == guest.model_at(guest.seq)


def test_replaying_an_applied_sequence_is_a_no_op(open_disk: OpenDisk, tmp_path: Path) -> None:
    disk = open_disk()
    guest = Guest(16 << 20, seed=21)
    for _ in range(20):
        guest.append()
        guest.scratch()
    feeder = Feeder(disk, guest)
    feeder.feed()
    disk.sync()
    used = disk.journal_bytes
    image = (tmp_path / "disk.img").read_bytes()

    disk.apply_write(5, 0, memoryview(b"\xff" * 4096))
    disk.apply_zero(6, 0, 1 << 20)
    disk.bookmark(7, "late", "app", 0.0)
    disk.sync()
    assert (disk.journal_bytes, (tmp_path / "disk.img").read_bytes()) == (used, image)

    disk.close()
    disk = open_disk()
    feeder = Feeder(disk, guest)
    feeder.feed()  # the whole stream again, as after a sender restart
    disk.sync()
    assert (disk.journal_bytes, (tmp_path / "disk.img").read_bytes()) == (used, image)
    assert all(p.tag != "late" for p in disk.points())


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param("torn-record", id="torn-record"),
        pytest.param("torn-header", id="torn-header"),
        pytest.param("garbage-tail", id="garbage-tail"),
    ],
)
def test_torn_journal_tail_is_ignored_on_reopen(damage: str, open_disk: OpenDisk, tmp_path: Path) -> None:
    disk = open_disk()
    guest = Guest(16 << 20, seed=22)
    for _ in range(20):
        guest.append()
    guest.fill_scratch()
    feeder = Feeder(disk, guest)
    feeder.feed()
    disk.sync()
    committed = disk.applied_seq
    segment = _last_segment(tmp_path / "disk-journal")
    committed_size = segment.stat().st_size
    # 8 MiB of undo spills from the journal buffer to the file; the new data is still held back
    # (write-ahead), which is the only state in which a journal tail can be torn.
    guest.fill_scratch()
    feeder.feed()
    disk.close()  # a crash: no sync, no commit record
    size = segment.stat().st_size
    assert size > committed_size
    with open(segment, "r+b") as f:
        if damage == "torn-record":
            f.truncate(size - 100)
        elif damage == "torn-header":
            f.truncate(committed_size + 20)
        else:
            f.seek(0, os.SEEK_END)
            f.write(random.Random(1).randbytes(3000))

    disk = open_disk()
    assert disk.applied_seq == committed
    assert segment.stat().st_size == committed_size
    assert (tmp_path / "disk.img").read_bytes() == guest.model_at(committed)
    feeder = Feeder(disk, guest)
    feeder.resend_after(disk.applied_seq)
    feeder.feed()
    disk.sync()
    assert (tmp_path / "disk.img").read_bytes() == guest.model_at(guest.seq)


def test_full_retention_volume_pauses_without_damage_then_catches_up(
    open_disk: OpenDisk, clock: Clock, tmp_path: Path
) -> None:
    disk = open_disk(retention_seconds=60.0, crash_points=CrashPointPolicy(5.0))
    guest = Guest(16 << 20, seed=23)
    guest.fill_scratch(1 << 18)
    feeder = Feeder(disk, guest)
    feeder.feed()
    disk.sync()
    disk.quota_bytes = disk.journal_bytes + (1 << 20)

    with pytest.raises(SiteRecoveryError) as full:
        for _ in range(200):
            guest.scratch()
            guest.append()
            feeder.feed()
            clock.advance(0.5)
            disk.sync()
    problem = full.value.first
    assert problem.code == "retention-volume-full"
    assert disk.paused == problem
    refused = feeder.next + 1
    assert disk.applied_seq == feeder.next < refused  # the refused write was not applied
    assert disk.journal_bytes <= disk.quota_bytes

    disk.sync()  # what was applied before the refusal can still be acknowledged
    acked = disk.applied_seq
    assert (tmp_path / "disk.img").read_bytes() == guest.model_at(acked)
    with pytest.raises(SiteRecoveryError):
        feeder.feed()  # still full: still paused
    disk.close()
    disk = open_disk(retention_seconds=60.0, quota_bytes=disk.quota_bytes)
    assert disk.applied_seq == acked
    assert (tmp_path / "disk.img").read_bytes() == guest.model_at(acked)

    clock.advance(61.0)  # the window moves on: pruning frees the volume
    feeder.disk = disk
    feeder.feed()
    disk.sync()
    assert disk.paused is None
    assert (tmp_path / "disk.img").read_bytes() == guest.model_at(guest.seq)
    assert disk.quota_bytes is not None and disk.journal_bytes <= disk.quota_bytes


def test_volume_full_at_sync_undoes_the_unacknowledged_batch(open_disk: OpenDisk, tmp_path: Path) -> None:
    disk = open_disk(pending_limit=64 << 10)  # part of the batch reaches the disk before the commit
    guest = Guest(16 << 20, seed=24)
    guest.fill_scratch()
    feeder = Feeder(disk, guest)
    feeder.feed()
    point = disk.take_crash_point()
    acked = disk.applied_seq
    guest.fill_scratch()
    feeder.feed()
    assert (tmp_path / "disk.img").read_bytes() != guest.model_at(acked)
    disk.quota_bytes = disk.journal_bytes  # no room left for the commit record

    with pytest.raises(SiteRecoveryError) as full:
        disk.sync()
    assert full.value.first.code == "retention-volume-full"
    assert disk.applied_seq == acked
    assert (tmp_path / "disk.img").read_bytes() == guest.model_at(acked)

    disk.quota_bytes = None
    feeder.resend_after(disk.applied_seq)
    feeder.feed()
    disk.sync()
    assert (tmp_path / "disk.img").read_bytes() == guest.model_at(guest.seq)
    disk.materialise_copy(point, tmp_path / "copy.img")
    assert (tmp_path / "copy.img").read_bytes() == guest.model_at(acked)


def test_pruning_keeps_exactly_the_window_and_bounds_space(
    open_disk: OpenDisk, clock: Clock, tmp_path: Path
) -> None:
    window = 60.0
    disk = open_disk(retention_seconds=window, crash_points=CrashPointPolicy(5.0))
    guest = Guest(16 << 20, seed=25)
    guest.fill_scratch(1 << 18)
    feeder = Feeder(disk, guest)
    feeder.feed()
    disk.sync()
    seen = set()
    usage = []
    per_tick = 2 * (16 * 4096 + 64)  # two scratch writes of at most 16 blocks, with headers
    for tick in range(400):
        guest.scratch()
        guest.scratch()
        feeder.feed()
        clock.advance(1.0)
        disk.sync()
        listed = disk.points()
        seen.update(listed)
        horizon = clock.now - window
        assert all(p.time >= horizon for p in listed)
        assert {p for p in seen if p.time >= horizon} <= set(listed)
        if tick >= 100:
            usage.append(disk.journal_bytes)
    # Space: the window plus at most one segment's span (window / 8) and headers, steady.
    assert max(usage) <= (window * 1.125 + 3) * per_tick + 20 * 4096
    oldest = disk.points()[0]
    assert oldest.time <= clock.now - window + 5.0 + 1.0
    disk.materialise_copy(oldest, tmp_path / "copy.img")
    assert (tmp_path / "copy.img").read_bytes() == guest.model_at(oldest.seq_for("disk"))


def test_zero_ranges_journal_only_what_they_replace(open_disk: OpenDisk, tmp_path: Path) -> None:
    disk = open_disk()
    disk.apply_zero(1, 0, 8 << 20)  # a hole already: nothing to undo
    disk.sync()
    empty = disk.journal_bytes
    disk.apply_write(2, 1 << 20, memoryview(b"\x01" * 65536))
    disk.sync()
    disk.apply_zero(3, 0, 8 << 20)
    disk.sync()
    grew = disk.journal_bytes - empty
    assert 65536 <= grew < 65536 + 1024
    assert (tmp_path / "disk.img").read_bytes() == bytes(16 << 20)
    assert os.stat(tmp_path / "disk.img").st_blocks == 0  # the zero range was punched, not written


def test_materialised_copy_is_sparse(open_disk: OpenDisk, tmp_path: Path) -> None:
    disk = open_disk(size=64 << 20)
    rng = random.Random(26)
    for seq in range(1, 9):
        disk.apply_write(seq, rng.randrange(64) << 20, memoryview(rng.randbytes(256 << 10)))
    point = disk.take_crash_point()
    disk.apply_write(9, 0, memoryview(rng.randbytes(256 << 10)))
    disk.sync()
    result = disk.materialise_copy(point, tmp_path / "copy.img")
    allocated = os.stat(tmp_path / "disk.img").st_blocks * 512
    assert result.bytes_copied <= allocated <= 9 * (256 << 10) + (1 << 20)
    assert os.stat(tmp_path / "copy.img").st_blocks * 512 <= allocated + (1 << 20)
    disk.rollback_to(point)
    assert (tmp_path / "copy.img").read_bytes() == (tmp_path / "disk.img").read_bytes()


def test_a_journal_is_opened_by_one_master_target_only(open_disk: OpenDisk) -> None:
    open_disk()
    with pytest.raises(SiteRecoveryError) as busy:
        open_disk()
    assert busy.value.first.code == "journal-in-use"
