"""An item's recovery points, as its master target reports them per disk (FW-3, FW-4).

A point of a machine is one that every disk of it has: crash and app points are inserted by the
agent into all of its disks at once with one tag, and group points carry one tag across every
machine of a replication group. `latest` (everything received) is always available.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy.orm import Session

from siterecovery.dataplane.assignments import PointInfo
from siterecovery.errors import Problem, SiteRecoveryError
from siterecovery.store.points import points_by_pair
from siterecovery.store.record import HeldFailover, ItemRecord, Replication

LATEST = "latest"
LATEST_APP = "latest-app"


@dataclass(frozen=True)
class ItemPoint:
    id: str  # the tag shared by every disk, or "latest"
    kind: str
    time: float
    disks: dict[str, str]  # pair id -> that disk's point id
    unusable: str = ""  # why it cannot be restored (a disk's journal is damaged before it)

    def as_dict(self) -> dict[str, object]:
        return {
            "id": self.id,
            "kind": self.kind,
            "time": self.time,
            "time_utc": datetime.fromtimestamp(self.time, UTC).isoformat(timespec="seconds"),
            "disks": dict(self.disks),
            "unusable": self.unusable,
        }


def item_points(s: Session, rep: Replication) -> list[ItemPoint]:
    """Every point all of the item's disks have, newest first, `latest` on top."""
    wanted = [p.pair_id for p in rep.pairs]
    per_pair = points_by_pair(s, rep.master_target, wanted)
    if not wanted or any(pid not in per_pair for pid in wanted):
        return []
    latest = {pid: next((pt for pt in per_pair[pid] if pt.kind == LATEST), None) for pid in wanted}
    out: list[ItemPoint] = []
    if all(latest.values()):
        out.append(
            ItemPoint(
                LATEST,
                LATEST,
                max(p.time for p in latest.values() if p),
                {pid: p.id for pid, p in latest.items() if p},
            )
        )
    by_tag: dict[str, dict[str, PointInfo]] = {}
    for pid in wanted:
        for pt in per_pair[pid]:
            if pt.tag and pt.kind != LATEST:
                by_tag.setdefault(pt.tag, {})[pid] = pt
    shared = [(tag, pts) for tag, pts in by_tag.items() if len(pts) == len(wanted)]
    for tag, pts in sorted(shared, key=lambda t: -max(p.time for p in t[1].values())):
        first = next(iter(pts.values()))
        out.append(
            ItemPoint(
                tag,
                first.kind,
                max(p.time for p in pts.values()),
                {pid: p.id for pid, p in pts.items()},
                "; ".join(f"{pid}: {p.unusable}" for pid, p in pts.items() if p.unusable),
            )
        )
    return out


def points_of(s: Session, rec: ItemRecord) -> list[ItemPoint]:
    """The points an item can fail over to now, or, failed over and not committed, change to."""
    if rec.replication is not None:
        return item_points(s, rec.replication)
    if rec.held is not None:
        return held_points(rec.held)
    return []


def held_points(held: HeldFailover) -> list[ItemPoint]:
    """The points listed when replication stopped for the failover (the journals still hold them)."""
    return [ItemPoint(p.id, p.kind, p.time, dict(p.disks)) for p in held.points]


def resolve(points: list[ItemPoint], wanted: str) -> ItemPoint:
    """latest, latest-app, a point id (tag) or a time (ISO 8601, epoch): the newest point at or before it."""
    if not points:
        raise _unavailable(wanted, "the master target reports no points for this item yet")
    if wanted in (LATEST, ""):
        return points[0]
    if wanted == LATEST_APP:
        app = [p for p in points if p.kind in ("app", "group") and not p.unusable]
        if not app:
            raise _unavailable(wanted, "no app-consistent point is retained")
        return app[0]
    exact = next((p for p in points if p.id == wanted), None)
    if exact is not None:
        if exact.unusable:
            raise SiteRecoveryError(
                Problem(
                    "recovery-point-unusable",
                    f"Recovery point {wanted!r} cannot be restored: {exact.unusable}.",
                    "Choose another recovery point (`points list` marks the unusable ones), "
                    "or fail over to the latest point.",
                )
            )
        return exact
    at = _as_time(wanted)
    if at is None:
        raise _unavailable(wanted, "it is neither a point id, latest, latest-app nor a time")
    older = [p for p in points if p.time <= at and p.id != LATEST and not p.unusable]
    if not older:
        raise _unavailable(wanted, "no retained point is that old")
    return older[0]


def _as_time(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        pass
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        return None
    return (parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)).timestamp()


def _unavailable(wanted: str, why: str) -> SiteRecoveryError:
    return SiteRecoveryError(
        Problem(
            "recovery-point-unavailable",
            f"Recovery point {wanted!r} cannot be used: {why}.",
            "List the item's points (`siterecovery points list ITEM`) and pick one of them.",
        )
    )
