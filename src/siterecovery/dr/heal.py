"""Alerts for frames refused for their checksum: every refusal is raised loudly, cleared once healed.

The process server reports each refused frame of its pairs (`RefusedFrame` in its statistics:
pair, sequence, range, the hop that damaged it) until the master target has acknowledged its
repair (`dataplane/healing.py`), and each loss of frames to a damaged frame header in its cache or
an agent's spool until the whole-pair resync that repairs it was applied. The monitor calls
`check_refused_frames` for each protected item on every pass: each refusal becomes one critical
`frame-refused` alert naming the item, disk, sequence and hop, active until it healed. One alert
per refusal, found again by its message (the message is built from the refusal alone), so a
refusal that healed before the monitor saw it still leaves its (cleared) alert, and a restarted
configuration server does not repeat one.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from siterecovery.dataplane.assignments import RefusedFrame
from siterecovery.store.events import clear_alert, raise_alert
from siterecovery.store.models import Component, Event, ReplicatedItem, now
from siterecovery.store.points import unusable_by_pair
from siterecovery.store.record import ItemRecord
from siterecovery.store.states import Health, Severity

ALERT = "frame-refused"
UNUSABLE = "recovery-points-unusable"


def _message(item_name: str, disk: str, e: RefusedFrame) -> str:
    if e.resync:
        return (
            f"Item {item_name}, disk {disk} (pair {e.pair_id}): frames after sequence {e.seq - 1} were "
            f"lost to a damaged frame header at hop {e.hop.value}; the whole disk is compared with "
            "the replica (delta resync) and recovery points in between are unusable."
        )
    where = f" (range {e.offset}+{e.length})" if e.length else ""
    return (
        f"Item {item_name}, disk {disk} (pair {e.pair_id}): frame sequence {e.seq}{where} was refused "
        f"for its checksum at hop {e.hop.value}; it is resent, or read again from the source disk."
    )


def check_refused_frames(s: Session, item: ReplicatedItem) -> Health:
    """Raise or clear the item's frame-refused alerts; critical while a refusal is not healed."""
    rep = ItemRecord.model_validate(item.details).replication
    if rep is None:
        return Health.NORMAL
    ps = s.get(Component, rep.process_server)
    disks = {p.pair_id: p.disk for p in rep.pairs}
    return alert_refused_frames(s, item.id, item.name, disks, (ps.stats or {}) if ps is not None else {})


def alert_refused_frames(
    s: Session, item_id: str, item_name: str, disks: dict[str, str], ps_stats: dict[str, Any]
) -> Health:
    """The item's frame-refused alerts from its process server's report (events read per refusal)."""
    raw = ps_stats.get("refused_frames", [])
    health = Health.NORMAL
    for entry in raw or []:
        if not isinstance(entry, dict) or entry.get("pair_id") not in disks:
            continue
        e = RefusedFrame.model_validate(entry)
        message = _message(item_name, disks[e.pair_id], e)
        existing = s.scalar(
            select(Event).where(
                Event.alert.is_(True),
                Event.code == ALERT,
                Event.object_type == "replicatedItem",
                Event.object_id == item_id,
                Event.message == message,
            )
        )
        if existing is None:
            s.add(
                Event(
                    severity=Severity.CRITICAL,
                    code=ALERT,
                    message=message,
                    object_type="replicatedItem",
                    object_id=item_id,
                    alert=True,
                    active=not e.healed,
                    cleared_at=now() if e.healed else None,
                )
            )
        elif existing.active and e.healed:
            existing.active = False
            existing.cleared_at = now()
        if not e.healed:
            health = Health.CRITICAL
    return health


def check_unusable_points(s: Session, item: ReplicatedItem) -> Health:
    """Warn while the master target lists points of the item it cannot restore (damaged journal
    records, a write missing while they were taken): they stay listed, marked, and are refused."""
    rep = ItemRecord.model_validate(item.details).replication
    mt = s.get(Component, rep.master_target) if rep is not None else None
    if rep is None or mt is None:
        return Health.NORMAL
    disks = {p.pair_id: p.disk for p in rep.pairs}
    unusable = {pid: why for (_, pid), why in unusable_by_pair(s, mt.id).items()}
    return alert_unusable_points(s, item.id, item.name, disks, unusable)


def alert_unusable_points(
    s: Session,
    item_id: str,
    item_name: str,
    disks: dict[str, str],
    unusable: dict[str, list[str]],
    active: bool = True,
) -> Health:
    """The unusable-points alert from why the master target's points of each pair cannot be
    restored (`store.points.unusable_by_pair`, in list order); `active` False: none is open."""
    bad: list[str] = []
    for pair_id, disk in disks.items():
        reasons = unusable.get(pair_id, [])
        if reasons:
            bad.append(f"disk {disk}: {len(reasons)} ({reasons[-1]})")
    if not bad:
        if active:
            clear_alert(s, UNUSABLE, "replicatedItem", item_id)
        return Health.NORMAL
    raise_alert(
        s,
        Severity.WARNING,
        UNUSABLE,
        f"Item {item_name} has recovery points that cannot be restored: {'; '.join(bad)}.",
        "replicatedItem",
        item_id,
    )
    return Health.WARNING
