"""Crash points materialised as the product does, for the writer's records to be checked in them.

The master target lists a pair's points with `point_infos` and makes a test-failover copy of one
with `JournaledDisk.materialise_copy`; here the same code runs on the journal once the master
target has been stopped (a journal has one owner at a time), so the check sees exactly the images
a test failover or a failover to that point would boot.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from siterecovery.dataplane.journal import JournaledDisk
from siterecovery.dataplane.master_target import JOURNAL_DIR
from siterecovery.dataplane.mt_points import find_point, point_infos
from tests.faults.records import Verdict, check_image

KEEP_EVERYTHING = 10 * 365 * 86400.0  # opening the journal must not prune what it checks


@dataclass(frozen=True)
class PointVerdict:
    point: str
    seq: int
    verdict: Verdict


def check_crash_points(
    retention_volume: Path, pair_id: str, target: Path, run_id: bytes, capacity: int, scratch: Path
) -> list[PointVerdict]:
    """Every crash point the master target lists for the pair, materialised and checked."""
    scratch.mkdir(parents=True, exist_ok=True)
    out: list[PointVerdict] = []
    journal = retention_volume / JOURNAL_DIR / pair_id
    with JournaledDisk(target, journal, KEEP_EVERYTHING, name=pair_id) as disk:
        for info in point_infos(disk):
            if info.kind != "crash":
                continue
            image = scratch / "point.img"
            disk.materialise_copy(find_point(disk, info.id), image)
            out.append(PointVerdict(info.id, info.seq, check_image(image, run_id, capacity)))
            image.unlink()
    return out
