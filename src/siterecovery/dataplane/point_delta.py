"""Recovery-point lists reported as deltas: a master target sends only what changed.

A master target lists every retained recovery point of every pair (220 a pair after a day, so
half a megabyte for 20 pairs); sending and checking all of it on every heartbeat was most of the
configuration server's work once points had accumulated. Instead the point lists are versioned:
a report carries `points_seq`, the server's reply acknowledges the version it now holds, and the
next report describes the lists as changes to that acknowledged version (`points_delta`: per
changed pair the ids removed and the points appended, or the whole list when the change is not an
append). The full lists go on the first report of a process, after the server asks for a resync
(its version is not the delta's base: a reply was lost, the database was restored from a backup,
another report came in between), and per pair whenever a delta could not reproduce the list
exactly. The master target checks each delta with `apply`; the server applies it to its rows of
points (`store.points`, the same rules as `apply`), so the lists the server holds are always
exactly the ones the master target reported.

Everything here works on the JSON form (what goes over the wire).
"""

from __future__ import annotations

from typing import Any

Points = list[dict[str, Any]]


def apply(old: Points, change: dict[str, Any]) -> Points:
    """A pair's point list after `change` (a `PairPointsDelta` as JSON)."""
    replace = change.get("replace")
    if replace is not None:
        return list(replace)
    gone = set(change.get("removed", []))
    return [p for p in old if p.get("id") not in gone] + list(change.get("added", []))


def diff(old: Points, new: Points) -> dict[str, Any]:
    """The change from `old` to `new`: removed ids and appended points, or the whole new list."""
    before = {p.get("id"): p for p in old}
    added = [p for p in new if before.get(p.get("id")) != p]
    keep = {p.get("id") for p in new}
    # A point whose content changed (marked unusable) is removed and added again.
    removed = [p.get("id") for p in old if p.get("id") not in keep or p in added]
    change: dict[str, Any] = {"removed": removed, "added": added}
    return change if apply(old, change) == new else {"replace": new}


class PointReports:
    """A master target's side: what the server acknowledged, and the next report to send."""

    def __init__(self) -> None:
        self.seq = 0
        self._acked: tuple[int, dict[str, Points]] | None = None
        self._pending: tuple[int, dict[str, Points]] | None = None
        self.points_sent = 0  # points in the reports sent so far (lists and deltas; for tests)

    def encode(self, stats: dict[str, Any]) -> dict[str, Any]:
        """`stats` (a master target's report as JSON) with its point lists as a delta if possible."""
        pairs = stats.get("pairs")
        if not isinstance(pairs, list):
            return stats
        self.seq += 1
        lists = {str(p["pair_id"]): list(p.get("points", [])) for p in pairs}
        self._pending = (self.seq, lists)
        out = {**stats, "points_seq": self.seq}
        out.pop("points_delta", None)
        if self._acked is None:
            self.points_sent += sum(len(v) for v in lists.values())
            return out
        base_seq, base = self._acked
        changes = {
            pid: diff(base.get(pid, []), pts) for pid, pts in lists.items() if base.get(pid, []) != pts
        }
        self.points_sent += sum(
            len(c.get("replace") or []) + len(c.get("added", [])) + len(c.get("removed", []))
            for c in changes.values()
        )
        out["pairs"] = [{**p, "points": []} for p in pairs]
        out["points_delta"] = {"base": base_seq, "pairs": changes}
        return out

    def acknowledge(self, reply: dict[str, Any]) -> None:
        """The server's reply to the report last encoded: it holds that version, or wants all."""
        if reply.get("points_resync"):
            self._acked = None
        elif self._pending is not None and reply.get("points_seq") == self._pending[0]:
            self._acked = self._pending
