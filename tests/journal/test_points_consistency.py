"""Every recovery point of a journaled disk materialises to a crash-consistent prefix of the log."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from siterecovery.dataplane.points import CrashPointPolicy, PointKind, group_points
from siterecovery.errors import SiteRecoveryError
from tests.journal.conftest import Clock, OpenDisk
from tests.journal.workload import Feeder, Guest, RecKind, parse_log


def _run(guest: Guest, feeder: Feeder, clock: Clock, steps: int, seed: int) -> None:
    """Guest appends records and churns; the MT applies with random lag and syncs now and then."""
    rng = random.Random(seed)
    for i in range(steps):
        if rng.random() < 0.8:
            guest.append()
        else:
            guest.scratch()
        if i % 40 == 39:
            guest.append(RecKind.QUIESCE)
            guest.bookmark("app", f"app-{i}", clock.now)
        while feeder.behind:
            feeder.feed(rng.randint(1, 3))
            if rng.random() < 0.3:
                clock.advance(rng.uniform(0.5, 3.0))
                feeder.disk.sync()
    feeder.disk.sync()


def test_every_listed_point_holds_a_clean_prefix_of_the_log(
    open_disk: OpenDisk, clock: Clock, tmp_path: Path
) -> None:
    disk = open_disk(crash_points=CrashPointPolicy(5.0))
    guest = Guest(disk_size := 16 << 20, seed=1)
    _run(guest, Feeder(disk, guest), clock, steps=400, seed=2)

    points = disk.points()
    kinds = [p.kind for p in points]
    assert kinds.count(PointKind.APP) == 10
    assert kinds.count(PointKind.CRASH) >= 20
    torn_seen = False
    out = tmp_path / "copy.img"
    for p in points:
        disk.materialise_copy(p, out)
        img = out.read_bytes()
        assert len(img) == disk_size
        verdict = parse_log(img, guest.log_region)
        assert verdict.clean, (p.id, verdict.reason)
        assert img == guest.model_at(p.seq_for("disk")), p.id
        if p.kind is PointKind.APP:
            assert verdict.last_kind == RecKind.QUIESCE and not verdict.torn, p.id
        torn_seen |= verdict.torn
    # Some crash points cut a record in half: the oracle really checked torn tails.
    assert torn_seen


def test_rollback_then_roll_forward_returns_to_latest_exactly(
    open_disk: OpenDisk, clock: Clock, tmp_path: Path
) -> None:
    disk = open_disk()
    guest = Guest(16 << 20, seed=3)
    _run(guest, Feeder(disk, guest), clock, steps=200, seed=4)
    latest = guest.model_at(guest.seq)
    points = disk.points()
    img = tmp_path / "disk.img"
    assert img.read_bytes() == latest

    for p in (points[len(points) // 2], points[-2], points[1], points[len(points) // 3]):
        disk.materialise_in_place(p)
        assert img.read_bytes() == guest.model_at(p.seq_for("disk")), p.id
    with pytest.raises(SiteRecoveryError) as refused:
        disk.apply_write(guest.seq + 1, 0, memoryview(b"x" * 512))
    assert refused.value.first.code == "disk-not-at-latest"

    # The chosen point survives a restart of the master target, and so does the redo.
    position = disk.position_seq
    disk.close()
    disk = open_disk()
    assert disk.position_seq == position
    result = disk.roll_forward_to(disk.latest_point())
    assert result.bytes_rewritten > 0
    assert img.read_bytes() == latest
    assert disk.applied_seq == guest.seq


def test_latest_costs_nothing_and_an_older_point_costs_what_was_written_since(
    open_disk: OpenDisk, clock: Clock, tmp_path: Path
) -> None:
    disk = open_disk()
    guest = Guest(16 << 20, seed=5)
    feeder = Feeder(disk, guest)
    _run(guest, feeder, clock, steps=100, seed=6)
    before = disk.take_crash_point()
    for _ in range(20):
        guest.scratch()
    feeder.feed()
    disk.sync()
    written_since = sum(len(op.data) or op.length for op in guest.history[before.seq_for("disk") :])

    result = disk.materialise_in_place(disk.latest_point())
    assert (result.bytes_moved, result.records) == (0, 0)

    result = disk.materialise_in_place(before)
    assert 0 < result.bytes_moved <= written_since
    assert result.bytes_copied == 0
    assert (tmp_path / "disk.img").read_bytes() == guest.model_at(before.seq_for("disk"))


def test_group_points_never_let_the_dependent_disk_run_ahead(
    open_disk: OpenDisk, clock: Clock, tmp_path: Path
) -> None:
    """B writes record n only after A wrote it; A and B are applied with independent lag."""
    a_disk, b_disk = open_disk("a"), open_disk("b")
    a, b = Guest(16 << 20, seed=7), Guest(16 << 20, seed=8)
    fa, fb = Feeder(a_disk, a), Feeder(b_disk, b)
    rng = random.Random(9)
    tags = []
    for i in range(300):
        a.append()
        if rng.random() < 0.1:  # the tag can land between A's write and B's dependent write
            tags.append(tag := f"grp-{i}")
            a.bookmark("group", tag, clock.now)
            b.bookmark("group", tag, clock.now)
        b.append()
        # B's process server is fast, A's lags behind by up to a few dozen operations.
        fb.feed()
        if rng.random() < 0.3:
            fa.feed(rng.randint(0, 30))
        clock.advance(rng.uniform(0.1, 1.0))
        for d in (a_disk, b_disk):
            if rng.random() < 0.5:
                d.sync()
    fa.feed()
    a_disk.sync()
    b_disk.sync()

    common = group_points([a_disk, b_disk])
    assert [p.tag for p in common] == tags
    for p in common:
        counts = []
        for d in (a_disk, b_disk):
            out = tmp_path / f"{d.name}-copy.img"
            d.materialise_copy(p, out)
            verdict = parse_log(out.read_bytes(), a.log_region)
            assert verdict.clean, verdict.reason
            counts.append(verdict.records)
        assert counts[1] <= counts[0], (p.tag, counts)
