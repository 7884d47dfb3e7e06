"""A damaged undo record met while materialising a point makes that point (and every older one)
unusable: refused with a stable code before the disk changes, listed as such, never served."""

from __future__ import annotations

from pathlib import Path

import pytest

from siterecovery.dataplane.mt_points import find_point, point_infos
from siterecovery.dr.recovery_points import ItemPoint, resolve
from siterecovery.errors import SiteRecoveryError
from tests.journal.conftest import Clock, OpenDisk

BLOCK = 4096


def _write_history(open_disk: OpenDisk, clock: Clock, **kw: object) -> None:
    disk = open_disk(**kw)
    seq = 0
    for tag, fill in (("p1", b"A"), ("p2", b"B"), ("p3", b"C"), ("", b"D")):
        seq += 1
        disk.apply_write(seq, 0, memoryview(fill * BLOCK))
        if tag:
            seq += 1
            disk.bookmark(seq, tag, "app", clock.now + seq)
        disk.sync()
    disk.close()
    # Sequences: A=1 p1=2 B=3 p2=4 C=5 p3=6 D=7; the undo record of write 5 holds B's bytes.


def _flip_undo_of_b(journal: Path) -> None:
    for segment in sorted(journal.glob("seg-*.jnl")):
        raw = bytearray(segment.read_bytes())
        at = raw.find(b"B" * BLOCK)
        if at >= 0:
            raw[at + 100] ^= 0x01
            segment.write_bytes(bytes(raw))
            return
    raise AssertionError("no undo record holding B")


@pytest.mark.parametrize(
    "segment_bytes",
    [
        # The active segment is verified on open: the damage is found then (it is not a torn tail,
        # as a verified commit follows it) and the journal keeps every committed record.
        pytest.param(256 << 20, id="active-segment"),
        # A sealed segment is verified when a move first needs it.
        pytest.param(1, id="sealed-segment"),
    ],
)
def test_damaged_undo_record_makes_older_points_unusable(
    open_disk: OpenDisk, clock: Clock, tmp_path: Path, segment_bytes: int
) -> None:
    _write_history(open_disk, clock, segment_bytes=segment_bytes)
    clock.advance(10)
    _flip_undo_of_b(tmp_path / "disk-journal")
    disk = open_disk(segment_bytes=segment_bytes)
    image = tmp_path / "disk.img"
    assert disk.applied_seq == 7
    found_on_open = any(p.unusable for p in point_infos(disk))
    assert found_on_open == (segment_bytes > 1)

    with pytest.raises(SiteRecoveryError) as err:
        disk.materialise_in_place(find_point(disk, _id(disk, "p2")))
    assert err.value.first.code == "recovery-point-unusable"
    assert err.value.first.detail["damaged_seq"] == 5
    assert image.read_bytes()[:BLOCK] == b"D" * BLOCK and disk.at_latest  # nothing was rolled
    with pytest.raises(SiteRecoveryError) as copy_err:  # a copy for test failover is refused too
        disk.materialise_copy(find_point(disk, _id(disk, "p1")), tmp_path / "copy.img")
    assert copy_err.value.first.code == "recovery-point-unusable"

    listed = {p.tag: p.unusable for p in point_infos(disk) if p.tag}
    assert listed["p1"] and listed["p2"] and not listed["p3"], listed
    # A point newer than the damage is restorable as before.
    disk.materialise_in_place(find_point(disk, _id(disk, "p3")))
    assert image.read_bytes()[:BLOCK] == b"C" * BLOCK
    disk.close()

    disk = open_disk(segment_bytes=segment_bytes)  # the damage is remembered across a restart
    assert {p.tag: bool(p.unusable) for p in point_infos(disk) if p.tag} == {
        "p1": True,
        "p2": True,
        "p3": False,
    }


def _id(disk: object, tag: str) -> str:
    return next(p.id for p in point_infos(disk) if p.tag == tag)  # type: ignore[arg-type]


def test_an_unusable_point_is_refused_when_chosen() -> None:
    points = [
        ItemPoint("latest", "latest", 30.0, {"p1": "latest"}),
        ItemPoint("app-2", "app", 20.0, {"p1": "x"}, "p1: journal record 5 is damaged"),
        ItemPoint("app-1", "app", 10.0, {"p1": "y"}),
    ]
    with pytest.raises(SiteRecoveryError) as err:
        resolve(points, "app-2")
    assert err.value.first.code == "recovery-point-unusable" and "damaged" in err.value.first.message
    assert resolve(points, "latest-app").id == "app-1"  # the newest *usable* app point
    assert resolve(points, "25").id == "app-1"
    assert points[1].as_dict()["unusable"] and points[2].as_dict()["unusable"] == ""
