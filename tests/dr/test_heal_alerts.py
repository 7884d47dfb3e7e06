"""A frame refused for its checksum raises a critical alert naming item, disk, sequence and hop,
active (and the item critical) until the process server reports it healed; never repeated."""

from __future__ import annotations

from sqlalchemy import select

from siterecovery.dataplane.assignments import RefusedFrame, RefusedHop
from siterecovery.dr.monitor import evaluate
from siterecovery.store.models import Event
from tests.dr.conftest import Plane


def _alerts(plane: Plane) -> list[tuple[str, bool, str]]:
    with plane.cp.db.session() as s:
        rows = s.scalars(select(Event).where(Event.alert.is_(True), Event.code == "frame-refused"))
        return [(e.severity, e.active, e.message) for e in rows]


def _refused(seq: int, **kw: object) -> RefusedFrame:
    fields: dict[str, object] = {
        "pair_id": "p1",
        "seq": seq,
        "offset": 1 << 20,
        "length": 4096,
        "hop": RefusedHop.CACHE,
        "refused_at": 1.0,
        "dropped": True,
        **kw,
    }
    return RefusedFrame.model_validate(fields)


def test_refused_frame_alert_is_raised_until_healed(plane: Plane) -> None:
    t0 = plane.t0
    plane.report(captured=50, acked=50, applied=50, at=t0)
    plane.report_refused(_refused(42))
    evaluate(plane.cp, now=t0)
    assert plane.item().health == "critical"
    [(severity, active, message)] = _alerts(plane)
    assert (severity, active) == ("critical", True)
    for part in ("web1", "disk disk0", "sequence 42", "process-server cache"):
        assert part in message, message

    plane.report_refused(_refused(42, refetch_seq=60, healed=True))  # re-read and applied
    evaluate(plane.cp, now=t0 + 1)
    evaluate(plane.cp, now=t0 + 2)
    assert plane.item().health == "normal"
    assert [(a[0], a[1]) for a in _alerts(plane)] == [("critical", False)]

    # One that healed between two passes (a link flip, resent at once) still leaves its alert.
    plane.report_refused(
        _refused(42, refetch_seq=60, healed=True), _refused(77, hop=RefusedHop.MT_LINK, healed=True)
    )
    evaluate(plane.cp, now=t0 + 3)
    alerts = _alerts(plane)
    assert [(a[0], a[1]) for a in alerts] == [("critical", False), ("critical", False)]
    assert "process server -> master target link" in alerts[1][2]


def test_unusable_points_warn(plane: Plane) -> None:
    from siterecovery.dataplane.assignments import PointInfo

    t0 = plane.t0
    bad = PointInfo(
        id="d:app:4", kind="app", time=t0, seq=4, tag="p2", unusable="journal record 5 is damaged"
    )
    plane.report(captured=9, acked=9, applied=9, at=t0, points=[bad])
    evaluate(plane.cp, now=t0)
    assert plane.item().health == "warning"
    with plane.cp.db.session() as s:
        [alert] = s.scalars(
            select(Event).where(Event.code == "recovery-points-unusable", Event.active.is_(True))
        )
        assert "disk disk0" in alert.message and "journal record 5 is damaged" in alert.message
    plane.report(captured=9, acked=9, applied=9, at=t0 + 1, points=[])  # pruned out of the window
    evaluate(plane.cp, now=t0 + 1)
    assert plane.item().health == "normal"


def test_frames_lost_to_a_damaged_header_alert_until_the_resync_applied(plane: Plane) -> None:
    t0 = plane.t0
    plane.report(captured=50, acked=50, applied=50, at=t0)
    lost = _refused(31, offset=0, length=0, resync=True)
    plane.report_refused(lost)
    evaluate(plane.cp, now=t0)
    assert plane.item().health == "critical"
    [(severity, active, message)] = _alerts(plane)
    assert (severity, active) == ("critical", True)
    for part in ("web1", "disk disk0", "after sequence 30", "damaged frame header", "process-server cache"):
        assert part in message, message
    plane.report_refused(lost.model_copy(update={"refetch_seq": 90, "healed": True}))
    evaluate(plane.cp, now=t0 + 1)
    assert plane.item().health == "normal"
    assert [(a[0], a[1]) for a in _alerts(plane)] == [("critical", False)]
