"""Recovery points: typed values, the crash-point timer policy and replication-group points.

A recovery point is a cut of per-disk sequence numbers with a time and a kind. The journal of each
disk (`journal.JournaledDisk`) records the points of that disk in its own segment stream, so a point
disappears together with the undo history it needs; this module only names them and combines them:
a *group* point is one tag present on every disk of every machine of a replication group, and the
*latest* point is everything a disk has durably applied. Selecting a point for failover (latest,
latest of a kind, or the newest at or before a time) also lives here so every caller picks the same
way.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol

from siterecovery.errors import Problem, SiteRecoveryError, Status


class PointKind(StrEnum):
    CRASH = "crash"
    APP = "app"
    GROUP = "group"
    LATEST = "latest"


@dataclass(frozen=True)
class DiskCut:
    """The state of one disk after every write with a sequence number <= seq."""

    disk: str
    seq: int


@dataclass(frozen=True)
class RecoveryPoint:
    id: str
    kind: PointKind
    time: float
    cut: tuple[DiskCut, ...]
    tag: str = ""

    @property
    def disks(self) -> tuple[str, ...]:
        return tuple(c.disk for c in self.cut)

    def seq_for(self, disk: str) -> int:
        for c in self.cut:
            if c.disk == disk:
                return c.seq
        raise SiteRecoveryError(
            Problem(
                code="recovery-point-not-for-disk",
                message=f"Recovery point {self.id!r} does not cover disk {disk!r}.",
                remediation="Choose a point listed for this disk or for its replication group.",
                detail={"point": self.id, "disk": disk},
            ),
            Status.UNPROCESSABLE,
        )


def disk_point(disk: str, kind: PointKind, seq: int, time: float, tag: str = "") -> RecoveryPoint:
    """A single-disk point; its id is stable across restarts because it is derived from the cut."""
    return RecoveryPoint(
        id=f"{disk}:{kind.value}:{seq}", kind=kind, time=time, cut=(DiskCut(disk, seq),), tag=tag
    )


@dataclass(frozen=True)
class CrashPointPolicy:
    """Take a crash-consistent point every `interval` seconds, but only when something was applied.

    Any prefix of a disk's ordered write stream is crash-consistent, so the journal may cut at any
    durable sequence number; skipping idle intervals keeps one point per distinct state.
    """

    interval: float = 5.0

    def due(self, now: float, last_point_time: float, last_point_seq: int, applied_seq: int) -> bool:
        if math.isinf(self.interval):
            return False
        return applied_seq > last_point_seq and now - last_point_time >= self.interval


# The master target's journals take no crash points of their own: the agent's crash bookmarks are
# a consistent cut across all disks of a machine, a per-disk timer is not.
NO_CRASH_POINTS = CrashPointPolicy(math.inf)


class PointSource(Protocol):
    """What a replicated disk offers for point listing (implemented by `JournaledDisk`)."""

    @property
    def name(self) -> str: ...

    def points(self) -> list[RecoveryPoint]: ...

    def latest_point(self) -> RecoveryPoint: ...


def group_points(disks: Sequence[PointSource]) -> list[RecoveryPoint]:
    """Points whose tag is present on every disk, oldest first: the group's common points in time."""
    if not disks:
        return []
    per_disk: list[dict[str, RecoveryPoint]] = []
    for d in disks:
        tagged = {p.tag: p for p in d.points() if p.tag and p.kind in (PointKind.APP, PointKind.GROUP)}
        per_disk.append(tagged)
    common = set(per_disk[0]).intersection(*per_disk[1:])
    out: list[RecoveryPoint] = []
    for tag in common:
        members = [m[tag] for m in per_disk]
        out.append(
            RecoveryPoint(
                id=f"group:{tag}",
                kind=PointKind.GROUP,
                time=max(p.time for p in members),
                cut=tuple(c for p in members for c in p.cut),
                tag=tag,
            )
        )
    out.sort(key=lambda p: p.time)
    return out


def latest_group_point(disks: Sequence[PointSource]) -> RecoveryPoint:
    """Everything received on every disk; not a common point in time across the disks."""
    members = [d.latest_point() for d in disks]
    return RecoveryPoint(
        id="group:latest",
        kind=PointKind.LATEST,
        time=min((p.time for p in members), default=0.0),
        cut=tuple(c for p in members for c in p.cut),
    )


def select_point(
    points: Sequence[RecoveryPoint], kind: PointKind | None = None, at_or_before: float | None = None
) -> RecoveryPoint:
    """The newest point of `kind` (any kind if None) no newer than `at_or_before` (FB-1, FW-2)."""
    eligible = [
        p
        for p in points
        if (kind is None or p.kind == kind) and (at_or_before is None or p.time <= at_or_before)
    ]
    if not eligible:
        raise SiteRecoveryError(
            Problem(
                code="recovery-point-unavailable",
                message=f"No {kind.value if kind else ''} recovery point"
                + (f" at or before {at_or_before}" if at_or_before is not None else "")
                + " is retained.",
                remediation="List the recovery points and choose one inside the retention window, "
                "or choose the latest point.",
                detail={"kind": kind.value if kind else None, "at_or_before": at_or_before},
            ),
            Status.NOT_FOUND,
        )
    return max(eligible, key=lambda p: (p.time, p.cut[0].seq if p.cut else 0))
