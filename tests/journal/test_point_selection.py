"""Recovery point values: the crash-point timer, group points and choosing a point for failover."""

from __future__ import annotations

import itertools

import pytest

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
