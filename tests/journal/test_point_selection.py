"""Recovery point values: the crash-point timer, group points and choosing a point for failover."""

from __future__ import annotations

import itertools

import pytest

from siterecovery.dataplane.mt_points import MAX_CRASH_POINTS, point_infos
from siterecovery.dataplane.points import (
    CrashPointPolicy,
    PointKind,
    RecoveryPoint,
    disk_point,
    group_points,
    select_point,
)
from siterecovery.errors import SiteRecoveryError
from tests.journal.conftest import Clock, OpenDisk


def test_crash_points_are_taken_every_interval_while_writes_arrive(open_disk: OpenDisk, clock: Clock) -> None:
    disk = open_disk(crash_points=CrashPointPolicy())  # the default: every 5 s
    for seq in range(1, 61):  # one write and one sync per second for a minute
        disk.apply_write(seq, seq * 4096, memoryview(b"\x07" * 4096))
        clock.advance(1.0)
        disk.sync()
    crash = [p for p in disk.points() if p.kind is PointKind.CRASH]
    assert 11 <= len(crash) <= 13
    assert all(b.time - a.time >= 5.0 for a, b in itertools.pairwise(crash))
    clock.advance(30.0)
    disk.sync()  # idle: no new state, no new point
    assert [p for p in disk.points() if p.kind is PointKind.CRASH] == crash


def test_group_point_needs_the_tag_on_every_disk(open_disk: OpenDisk, clock: Clock) -> None:
    a, b = open_disk("a"), open_disk("b")
    a.bookmark(1, "t1", "group", clock.now)
    b.bookmark(1, "t1", "group", clock.now)
    a.bookmark(2, "t2", "group", clock.now + 1)  # b never received t2
    a.sync()
    b.sync()
    (common,) = group_points([a, b])
    assert common.tag == "t1" and common.disks == ("a", "b")
    assert common.seq_for("a") == 1 and common.seq_for("b") == 1


def test_select_point_by_kind_and_time() -> None:
    points = [
        disk_point("d", PointKind.CRASH, 10, 100.0),
        disk_point("d", PointKind.APP, 11, 101.0, "app-1"),
        disk_point("d", PointKind.CRASH, 20, 110.0),
    ]
    assert select_point(points).id == "d:crash:20"
    assert select_point(points, kind=PointKind.APP).tag == "app-1"
    assert select_point(points, at_or_before=105.0).id == "d:app:11"
    with pytest.raises(SiteRecoveryError) as none:
        select_point(points, at_or_before=50.0)
    assert none.value.first.code == "recovery-point-unavailable"


def test_point_for_another_disk_is_refused() -> None:
    point: RecoveryPoint = disk_point("d", PointKind.CRASH, 1, 1.0)
    with pytest.raises(SiteRecoveryError) as other:
        point.seq_for("e")
    assert other.value.first.code == "recovery-point-not-for-disk"


def test_expired_point_cannot_be_materialised(open_disk: OpenDisk, clock: Clock) -> None:
    disk = open_disk(retention_seconds=10.0)
    disk.apply_write(1, 0, memoryview(b"\x01" * 4096))
    old = disk.take_crash_point()
    for seq in range(2, 40):
        clock.advance(1.0)
        disk.apply_write(seq, 0, memoryview(bytes([seq]) * 4096))
        disk.sync()
    assert old not in disk.points()
    with pytest.raises(SiteRecoveryError) as gone:
        disk.rollback_to(old)
    assert gone.value.first.code == "recovery-point-unavailable"


def test_listed_crash_points_thin_with_age_and_agree_across_disks(open_disk: OpenDisk, clock: Clock) -> None:
    """FW-3: a day of crash points every 5 s stays choosable, thinned as ASR does (all of the last
    15 min, one per 5 min up to 2 h, one per hour beyond), and every disk lists the same tags."""
    day = 24 * 3600.0
    disks = [
        open_disk(f"d{n}", retention_seconds=day, crash_points=CrashPointPolicy(interval=1e9)) for n in (0, 1)
    ]
    start = clock.now
    for seq, at in enumerate(range(0, int(day) - 60, 5), start=1):  # as the agent bookmarks them
        for d in disks:
            d.bookmark(seq, f"crash-{seq}", "crash", start + at)
    clock.advance(day - 60)
    for d in disks:
        d.sync()
    listed = [[p for p in point_infos(d, clock.now) if p.kind == "crash"] for d in disks]
    assert [p.tag for p in listed[0]] == [p.tag for p in listed[1]]  # so the machine has them all
    crash, now = listed[0], clock.now
    assert len(crash) <= MAX_CRASH_POINTS
    ages = [now - p.time for p in crash]
    assert sum(a <= 15 * 60 for a in ages) == 15 * 60 // 5  # every recent one
    middle = [p.time for p, a in zip(crash, ages, strict=True) if 15 * 60 < a <= 2 * 3600]
    assert len({int(t // 300) for t in middle}) == len(middle) >= 20  # one per 5 minutes
    old = [p.time for p, a in zip(crash, ages, strict=True) if a > 2 * 3600]
    assert len({int(t // 3600) for t in old}) == len(old) >= 21  # one per hour
    assert old[0] - start < 3600  # a point of the day's first hour can still be chosen
