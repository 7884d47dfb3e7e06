"""Crash points materialised as the product does, for the writer's records to be checked in them.

The points are the ones the configuration server lists for the machine (`points list`: every
disk's point of one tag, with `unusable` set where the master target knows one cannot be restored).
Each is materialised with the code a test failover runs on the master target (`find_point`, then
`JournaledDisk.materialise_copy`), here on the journal once the master target has stopped (a
journal has one owner at a time), so the check sees exactly the image a failover would boot.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from siterecovery.dataplane.journal import JournaledDisk
from siterecovery.dataplane.master_target import JOURNAL_DIR
from siterecovery.dataplane.mt_points import find_point
from siterecovery.demo.environment import Environment
from siterecovery.errors import SiteRecoveryError
from tests.conftest import run_cli
from tests.faults.records import Verdict

KEEP_EVERYTHING = 10 * 365 * 86400.0  # opening the journal must not prune what it checks


@dataclass(frozen=True)
class PointVerdict:
    point: str
    verdict: Verdict | None  # None: the product refused to materialise it
    listed_unusable: str = ""
    refused: str = ""

    @property
    def served_damaged(self) -> bool:
        """A point the product would boot that is not a clean prefix: never acceptable."""
        return self.verdict is not None and not self.verdict.clean


def listed_points(env: Environment, machine: str) -> list[dict[str, Any]]:
    out = run_cli("-o", "json", "points", "list", machine, env=env.cli_env)
    return list(json.loads(out.stdout))


def check_crash_points(
    listed: list[dict[str, Any]],
    retention_volume: Path,
    pair_id: str,
    target: Path,
    check: Callable[[Path], Verdict],
    scratch: Path,
) -> list[PointVerdict]:
    """Every listed crash point of the pair, materialised and judged by `check` (the writer's
    records, or a VM guest's file system and files)."""
    scratch.mkdir(parents=True, exist_ok=True)
    out: list[PointVerdict] = []
    journal = retention_volume / JOURNAL_DIR / pair_id
    with JournaledDisk(target, journal, KEEP_EVERYTHING, name=pair_id) as disk:
        for p in listed:
            if p["kind"] != "crash":
                continue
            unusable = str(p.get("unusable", ""))
            image = scratch / "point.img"
            try:
                disk.materialise_copy(find_point(disk, p["disks"][pair_id]), image)
            except SiteRecoveryError as exc:
                out.append(PointVerdict(p["id"], None, unusable, exc.first.code))
                continue
            out.append(PointVerdict(p["id"], check(image), unusable))
            image.unlink()
    return out
