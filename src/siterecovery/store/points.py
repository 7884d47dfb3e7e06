"""A master target's recovery-point lists, one row per point (`mt_points`), not in its stats JSON.

A master target lists every retained point of every pair (220 a pair after a day) and reports
them as deltas (`dataplane.point_delta`). Stored inside `components.stats`, the whole document
was decoded, merged and re-encoded on every heartbeat, so an idle master target's heartbeat cost
grew with its points. Here a heartbeat applies its delta as row inserts and deletes: one with
no changes touches no point row; a full report replaces the lists. `components.stats` keeps the
rest of the report (its pairs with `points` left empty, and `points_seq`, the version held).

Readers ask this module for the lists (`points_by_pair`, `unusable_by_pair`, `with_points`);
`store_report` is the same decision as `point_delta.merge`, so what is held is still exactly
what the master target reported.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, TypeVar

from sqlalchemy import delete, func, insert, literal_column, select, tuple_
from sqlalchemy.orm import Session

from siterecovery.dataplane.assignments import PointInfo
from siterecovery.dataplane.point_delta import Points
from siterecovery.store.models import Component, MasterTargetPoint
from siterecovery.store.states import ComponentKind

T = TypeVar("T")
CHUNK = 500


def _rows(mt_id: str, pair_id: str, first: int, points: Points) -> list[dict[str, Any]]:
    return [
        {
            "master_target_id": mt_id,
            "pair_id": pair_id,
            "position": first + i,
            "point_id": str(p.get("id")),
            "kind": str(p.get("kind")),
            "time": float(p.get("time", 0.0)),
            "seq": int(p.get("seq", 0)),
            "tag": str(p.get("tag", "")),
            "unusable": str(p.get("unusable", "")),
        }
        for i, p in enumerate(points)
    ]


def _as_json(row: MasterTargetPoint) -> dict[str, Any]:
    # The keys and order of `PointInfo`'s JSON: the API shows these lists unchanged.
    return {
        "id": row.point_id,
        "kind": row.kind,
        "time": row.time,
        "seq": row.seq,
        "tag": row.tag,
        "unusable": row.unusable,
    }


def _chunks(values: list[T]) -> Iterator[list[T]]:
    # Bounded statements: SQLite takes at most 32,766 parameters, and a delta may list 100,000.
    for i in range(0, len(values), CHUNK):
        yield values[i : i + CHUNK]


def _apply(s: Session, mt_id: str, replaced: dict[str, Points], changes: dict[str, dict[str, Any]]) -> None:
    """Lists replaced and `point_delta.apply` changes, as rows, in at most four statements
    whatever the number of pairs: deletes (whole lists, removed ids), the last positions of the
    lists appended to, and one insert of every point added (more only for huge deltas)."""
    mine = MasterTargetPoint.master_target_id == mt_id
    for pid, change in changes.items():
        if change.get("replace") is not None:
            replaced[pid] = list(change["replace"])
    appended = {pid: c for pid, c in changes.items() if pid not in replaced}
    for chunk in _chunks(sorted(replaced)):
        s.execute(delete(MasterTargetPoint).where(mine & MasterTargetPoint.pair_id.in_(chunk)))
    removed = [(pid, str(r)) for pid, c in appended.items() for r in c.get("removed", [])]
    for gone in _chunks(removed):
        s.execute(
            delete(MasterTargetPoint).where(
                mine & tuple_(MasterTargetPoint.pair_id, MasterTargetPoint.point_id).in_(gone)
            )
        )
    rows = [r for pid, pts in replaced.items() for r in _rows(mt_id, pid, 0, pts)]
    growing = sorted(pid for pid, c in appended.items() if c.get("added"))
    for chunk in _chunks(growing):
        last = dict(
            s.execute(
                select(MasterTargetPoint.pair_id, func.max(MasterTargetPoint.position))
                .where(mine & MasterTargetPoint.pair_id.in_(chunk))
                .group_by(MasterTargetPoint.pair_id)
            ).all()
        )
        for pid in chunk:
            first = 0 if last.get(pid) is None else int(last[pid]) + 1
            rows += _rows(mt_id, pid, first, list(appended[pid]["added"]))
    if rows:
        s.execute(insert(MasterTargetPoint), rows)


def store_report(s: Session, row: Component, incoming: dict[str, Any]) -> tuple[dict[str, Any], bool]:
    """Apply a master target's report's point lists to the table; returns the stats to keep (its
    pairs without points) and whether the master target must resync (send its full lists).

    A full report (no `points_delta`) replaces the lists. A delta applies when the held lists are
    its `base` version; when they already are its own version (a retried report) it is not
    applied twice; otherwise the held lists stay, their version becomes unknown (`points_seq` 0
    is never a delta's result) and the master target is asked for its full lists.
    """
    previous = row.stats or {}
    delta = incoming.get("points_delta")
    out = {k: v for k, v in incoming.items() if k != "points_delta"}
    pairs = [p for p in incoming.get("pairs", []) or [] if isinstance(p, dict)]
    out["pairs"] = [{**p, "points": []} for p in pairs]
    reported = {str(p.get("pair_id")) for p in pairs}
    # Pairs no longer reported lose their points; found from the kept stats, not the table.
    held = {str(p.get("pair_id")) for p in previous.get("pairs", []) or [] if isinstance(p, dict)}
    if held - reported:
        mine = MasterTargetPoint.master_target_id == row.id
        s.execute(
            delete(MasterTargetPoint).where(mine & MasterTargetPoint.pair_id.in_(sorted(held - reported)))
        )
    if delta is None:
        _apply(s, row.id, {str(p.get("pair_id")): list(p.get("points", []) or []) for p in pairs}, {})
        return out, False
    stored_seq = previous.get("points_seq")
    in_step = bool(stored_seq) and stored_seq == delta.get("base")
    if in_step:
        changes: dict[str, Any] = delta.get("pairs", {})
        _apply(s, row.id, {}, {pid: changes[pid] for pid in sorted(reported & set(changes))})
        return out, False
    if stored_seq == incoming.get("points_seq"):  # retried: already applied
        return out, False
    out["points_seq"] = 0
    return out, True


def point_lists(s: Session, mt_id: str, pair_ids: list[str] | None = None) -> dict[str, Points]:
    """The master target's lists as JSON, by pair (every pair with a point, or those asked)."""
    query = select(MasterTargetPoint).where(MasterTargetPoint.master_target_id == mt_id)
    if pair_ids is not None:
        query = query.where(MasterTargetPoint.pair_id.in_(pair_ids))
    out: dict[str, Points] = {}
    for r in s.scalars(query.order_by(MasterTargetPoint.pair_id, MasterTargetPoint.position)):
        out.setdefault(r.pair_id, []).append(_as_json(r))
    return out


def points_by_pair(s: Session, mt_id: str, pair_ids: list[str]) -> dict[str, list[PointInfo]]:
    return {
        pid: [PointInfo.model_validate(p) for p in pts]
        for pid, pts in point_lists(s, mt_id, pair_ids).items()
    }


def unusable_by_pair(s: Session, mt_id: str | None = None) -> dict[tuple[str, str], list[str]]:
    """Why points cannot be restored, by (master target, pair), in list order: the unusable ones
    only (few), so the RPO monitor reads them for every master target in one statement."""
    query = select(MasterTargetPoint.master_target_id, MasterTargetPoint.pair_id, MasterTargetPoint.unusable)
    query = query.where(MasterTargetPoint.unusable != literal_column("''"))  # as the partial index says
    if mt_id is not None:
        query = query.where(MasterTargetPoint.master_target_id == mt_id)
    out: dict[tuple[str, str], list[str]] = {}
    order = (MasterTargetPoint.master_target_id, MasterTargetPoint.pair_id, MasterTargetPoint.position)
    for mt, pid, why in s.execute(query.order_by(*order)):
        out.setdefault((mt, pid), []).append(why)
    return out


def with_points(s: Session, row: Component) -> dict[str, Any]:
    """A component's last report as it sent it: a master target's pairs with their points."""
    stats = dict(row.stats or {})
    if row.kind != ComponentKind.MASTER_TARGET or not isinstance(stats.get("pairs"), list):
        return stats
    lists = point_lists(s, row.id)
    stats["pairs"] = [
        {**p, "points": lists.get(str(p.get("pair_id")), [])} if isinstance(p, dict) else p
        for p in stats["pairs"]
    ]
    return stats


def forget(s: Session, mt_id: str) -> None:
    """A removed master target's points go with it."""
    s.execute(delete(MasterTargetPoint).where(MasterTargetPoint.master_target_id == mt_id))
