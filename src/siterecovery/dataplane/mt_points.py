"""The master target's recovery-point services: listing points, moving disks, copies, retention volumes.

The master target applies streams (`master_target.py`); this module is what it does with the
retention journals besides applying: it lists each pair's restorable points for its statistics,
finds a point by the id the configuration server sends back, materialises copies for test failover
once per request (remembered in `<state_dir>/copies.json` so a restart does not repeat them), and
describes the candidate retention volumes with their RP-RET eligibility.
"""

from __future__ import annotations

import json
import logging
import math
import os
import queue
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from pathlib import Path

from siterecovery.dataplane.apply import DiskApplier
from siterecovery.dataplane.assignments import CopyResult, PointCopy, PointInfo, RetentionVolume
from siterecovery.dataplane.journal import JournaledDisk
from siterecovery.dataplane.points import PointKind, RecoveryPoint, disk_point
from siterecovery.dataplane.retention import discover_volumes
from siterecovery.errors import Problem, SiteRecoveryError, Status

log = logging.getLogger(__name__)

MAX_CRASH_POINTS = 300  # listed per pair at most; app and group points are all listed
# Which retained crash points are listed (and so can be chosen), as ASR thins them: every one of
# the last 15 minutes, then the newest of each 5 minutes up to 2 hours old, then the newest of each
# hour of the retention window. Chosen by the points' own times, so every disk of a machine lists
# the same ones (a machine's points are the tags all its disks have).
LISTED_CRASH_POINTS: tuple[tuple[float, float], ...] = (
    (15 * 60.0, 0.0),
    (2 * 3600.0, 300.0),
    (math.inf, 3600.0),
)
MAX_COPY_RESULTS = 200  # remembered and reported


def no_journal(pair_id: str) -> SiteRecoveryError:
    return SiteRecoveryError(
        Problem(
            code="retention-volume-missing",
            message=f"Pair {pair_id!r} has no retention journal on this master target, so it has no "
            "recovery points other than the newest state.",
            remediation="Give the master target a retention volume (--retention-volume or the "
            "replication policy's volume) and re-enable replication of the pair.",
        ),
        Status.CONFLICT,
    )


def listed_crash_points(crash: Sequence[RecoveryPoint], now: float) -> list[RecoveryPoint]:
    """The crash points to list, oldest first, thinned by age (LISTED_CRASH_POINTS)."""
    kept: list[RecoveryPoint] = []
    buckets: set[tuple[float, int]] = set()
    for p in reversed(crash):  # newest first: the newest of each bucket stays
        spacing = next(s for limit, s in LISTED_CRASH_POINTS if now - p.time <= limit)
        if spacing:
            bucket = (spacing, int(p.time // spacing))
            if bucket in buckets:
                continue
            buckets.add(bucket)
        kept.append(p)
    return kept[:MAX_CRASH_POINTS][::-1]


def point_infos(disk: JournaledDisk, now: float | None = None) -> list[PointInfo]:
    """Every restorable point, oldest first: crash points thinned by age, all app/group ones, latest."""
    points = disk.points()
    crash = listed_crash_points(
        [p for p in points if p.kind is PointKind.CRASH], time.time() if now is None else now
    )
    keep = {id(p) for p in crash}
    listed = [p for p in points if p.kind is not PointKind.CRASH or id(p) in keep]
    listed.append(disk.latest_point())
    damaged = disk.damaged_below
    return [
        PointInfo(
            id=p.id,
            kind=p.kind.value,
            time=p.time,
            seq=p.cut[0].seq,
            tag=p.tag,
            unusable=f"journal record {damaged} is damaged" if p.cut[0].seq < damaged else "",
        )
        for p in listed
    ]


def find_point(disk: JournaledDisk, point_id: str) -> RecoveryPoint:
    """The point with this id; a `latest` id names the newest state at its sequence."""
    for p in disk.points():
        if p.id == point_id:
            return p
    latest = disk.latest_point()
    if point_id == latest.id:
        return latest
    name, _, rest = point_id.partition(":")
    kind, _, seq = rest.partition(":")
    if name == disk.name and kind == PointKind.LATEST.value and seq.lstrip("-").isdigit():
        # A "latest" listed earlier: the newest state then, still restorable while its undo is kept.
        return disk_point(disk.name, PointKind.LATEST, int(seq), 0.0)
    raise SiteRecoveryError(
        Problem(
            code="recovery-point-unavailable",
            message=f"Recovery point {point_id!r} of pair {disk.name!r} is not retained.",
            remediation="List the pair's recovery points and choose one inside the retention window.",
            detail={"point": point_id, "pair": disk.name},
        ),
        Status.NOT_FOUND,
    )


def position_id(disk: JournaledDisk) -> str:
    """The id of the point the disk is materialised at (after a restart: found by its sequence)."""
    if disk.at_latest:
        return "latest"
    seq = disk.position_seq
    for p in reversed(disk.points()):
        if p.cut[0].seq == seq:
            return p.id
    return disk_point(disk.name, PointKind.LATEST, seq, 0.0).id


PairLookup = Callable[[str], tuple[DiskApplier, AbstractContextManager[object]] | None]


class Copier:
    """Materialises requested copies one at a time in a worker thread, once per request id."""

    def __init__(self, state_dir: Path, lookup: PairLookup) -> None:
        self._path = state_dir / "copies.json"
        self._lookup = lookup
        self._done: dict[str, CopyResult] = {}
        if self._path.exists():
            for raw in json.loads(self._path.read_text()):
                result = CopyResult.model_validate(raw)
                self._done[result.request_id] = result
        self._queued: set[str] = set()
        self._queue: queue.Queue[PointCopy | None] = queue.Queue()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="mt-copies", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._queue.put(None)
        if self._thread.is_alive():
            self._thread.join(timeout=60)

    def request(self, copies: Sequence[PointCopy]) -> None:
        with self._lock:
            for c in copies:
                if c.request_id not in self._done and c.request_id not in self._queued:
                    self._queued.add(c.request_id)
                    self._queue.put(c)

    @property
    def results(self) -> list[CopyResult]:
        with self._lock:
            return list(self._done.values())

    def _run(self) -> None:
        while (req := self._queue.get()) is not None:
            result = self._copy(req)
            with self._lock:
                self._queued.discard(req.request_id)
                self._done[req.request_id] = result
                while len(self._done) > MAX_COPY_RESULTS:
                    self._done.pop(next(iter(self._done)))
                saved = [r.model_dump(mode="json") for r in self._done.values()]
            tmp = self._path.with_suffix(".tmp")
            tmp.write_text(json.dumps(saved))
            os.replace(tmp, self._path)

    def _copy(self, req: PointCopy) -> CopyResult:
        try:
            found = self._lookup(req.pair_id)
            if found is None:
                raise SiteRecoveryError(
                    Problem(
                        code="mt-disk-not-attached",
                        message=f"Pair {req.pair_id!r} has no target disk attached to this master target.",
                        remediation="Copy a point of a pair this master target replicates.",
                    ),
                    Status.NOT_FOUND,
                )
            applier, lock = found
            if not isinstance(applier, JournaledDisk):
                raise no_journal(req.pair_id)
            req.out_path.parent.mkdir(parents=True, exist_ok=True)
            with lock:
                result = applier.materialise_copy(find_point(applier, req.point), req.out_path)
            log.info("copied point %s of %s to %s (%s)", req.point, req.pair_id, req.out_path, result)
            return CopyResult(request_id=req.request_id, ok=True, bytes_moved=result.bytes_moved)
        except SiteRecoveryError as exc:
            return CopyResult(
                request_id=req.request_id, ok=False, error=f"{exc.first.code}: {exc.first.message}"
            )
        except OSError as exc:
            return CopyResult(request_id=req.request_id, ok=False, error=f"copy-failed: {exc}")


def describe_volumes(
    candidates: Sequence[Path], target_disks: Sequence[Path], cache_dirs: Sequence[Path]
) -> list[RetentionVolume]:
    """RP-RET: each candidate retention volume with its eligibility and the reason if not."""
    return [
        RetentionVolume(
            path=v.path,
            capacity_bytes=v.capacity_bytes,
            free_bytes=v.free_bytes,
            fs_type=v.fs_type,
            name=v.name,
            eligible=v.eligible,
            reason=v.reason,
            locked=v.locked,
            replication_target=v.replication_target,
            cache_or_install=v.cache_or_install,
        )
        for v in discover_volumes(candidates, target_disks=target_disks, cache_dirs=cache_dirs)
    ]
