"""A master target's recovery-point lists go as deltas: an idle heartbeat sends O(changes) points.

Real API (in process), real database, the master target's real control client; what is sent and
what is stored is counted and compared, never timed.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from siterecovery.config import load_server_config
from siterecovery.dataplane.assignments import MasterTargetPairStats, MasterTargetStats, PointInfo
from siterecovery.dataplane.control_client import ControlClient, Registration
from siterecovery.server.app import create_app
from siterecovery.store.context import ControlPlane, open_control_plane
from siterecovery.store.models import Component
from siterecovery.store.points import with_points

PAIRS = 20
POINTS = 220  # a day of thinned points per pair


def _stats(points: dict[str, list[PointInfo]], seq: int) -> MasterTargetStats:
    return MasterTargetStats(
        pairs=[
            MasterTargetPairStats(pair_id=p, applied_seq=seq, last_applied_time=1000.0 + seq, points=pts)
            for p, pts in points.items()
        ],
        attached_disks=len(points),
    )


def _day_of_points() -> dict[str, list[PointInfo]]:
    return {
        f"pair{n:02d}": [
            PointInfo(id=f"p{n}-{k}", kind="crash", time=1000.0 + k, seq=k) for k in range(POINTS)
        ]
        for n in range(PAIRS)
    }


class Plane:
    """A configuration server in process that can be restarted on the same state directory."""

    def __init__(self, state: Path) -> None:
        self.state = state
        self.cp: ControlPlane = open_control_plane(load_server_config(state))
        self.http = TestClient(create_app())
        self.http.__enter__()

    def restart(self) -> None:
        self.close()
        self.cp = open_control_plane(load_server_config(self.state))
        self.http = TestClient(create_app())
        self.http.__enter__()

    def close(self) -> None:
        self.http.__exit__(None, None, None)
        self.cp.db.engine.dispose()

    def stored(self, component_id: str) -> dict[str, Any]:
        with self.cp.db.session() as s:
            row = s.get(Component, component_id)
            assert row is not None
            return with_points(s, row)


@pytest.fixture
def plane(tmp_path: Path) -> Iterator[Plane]:
    p = Plane(tmp_path / "state")
    try:
        yield p
    finally:
        p.close()


@pytest.fixture
def mt(plane: Plane, tmp_path: Path) -> Iterator[tuple[ControlClient, list[dict[str, Any]]]]:
    """A registered master target's control client; the replies it got, in order."""
    replies: list[dict[str, Any]] = []

    def keep(response: httpx.Response) -> None:
        if response.url.path.endswith("/heartbeat"):
            response.read()
            replies.append(response.json())

    (tmp_path / "mt").mkdir()
    client = ControlClient(
        "http://testserver", tmp_path / "mt", Registration("master-target", "mt-0", "cloud")
    )
    client._http = TestClient(create_app())  # registering closes it (and pins the CA)
    client.register(plane.cp.passphrase())
    client._http = plane.http
    plane.http.event_hooks = {"response": [keep]}
    try:
        yield client, replies
    finally:
        plane.http.event_hooks = {"response": []}


def _sent(client: ControlClient) -> int:
    assert client._points is not None
    return client._points.points_sent


def _lists(stats: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    return {p["pair_id"]: p["points"] for p in stats["pairs"]}


def _expected(points: dict[str, list[PointInfo]]) -> dict[str, list[dict[str, Any]]]:
    return _lists(_stats(points, 0).model_dump(mode="json"))


def test_an_idle_master_target_sends_only_the_points_that_changed(
    plane: Plane, mt: tuple[ControlClient, list[dict[str, Any]]]
) -> None:
    client, replies = mt
    points = _day_of_points()
    client.heartbeat(_stats(points, 1))
    assert _sent(client) == PAIRS * POINTS  # the first report of a process is the full lists
    assert replies[-1]["points_resync"] is False and replies[-1]["points_seq"] == 1

    before = _sent(client)
    for seq in range(2, 5):  # idle: applied sequences move, the points do not
        client.heartbeat(_stats(points, seq))
    assert _sent(client) == before  # no point sent
    stored = plane.stored(client.component_id or "")
    assert _lists(stored) == _expected(points) and stored["pairs"][0]["applied_seq"] == 4
    assert "points_delta" not in stored

    # One pair gains a point and loses its oldest (thinning); another point turns unusable.
    points["pair03"] = [*points["pair03"][1:], PointInfo(id="p3-new", kind="crash", time=5000.0, seq=999)]
    points["pair07"][5] = points["pair07"][5].model_copy(update={"unusable": "journal-damaged"})
    before = _sent(client)
    client.heartbeat(_stats(points, 5))
    assert _sent(client) - before <= 2 + POINTS  # the append is 2; the changed middle point resends one list
    assert _lists(plane.stored(client.component_id or "")) == _expected(points)


def test_a_restarted_server_keeps_applying_deltas_to_the_same_lists(
    plane: Plane, mt: tuple[ControlClient, list[dict[str, Any]]]
) -> None:
    client, replies = mt
    points = _day_of_points()
    client.heartbeat(_stats(points, 1))
    plane.restart()  # the lists the server acknowledged are in its database, not its memory
    client._http = plane.http
    plane.http.event_hooks = {"response": [lambda r: (r.read(), replies.append(r.json()))]}
    points["pair00"] = [*points["pair00"][2:], PointInfo(id="p0-new", kind="app", time=6000.0, seq=1000)]
    before = _sent(client)
    client.heartbeat(_stats(points, 2))
    assert replies[-1]["points_resync"] is False and _sent(client) - before == 3
    assert _lists(plane.stored(client.component_id or "")) == _expected(points)


def test_a_gap_or_a_restored_database_leads_to_a_full_resync_and_the_same_lists(
    plane: Plane, mt: tuple[ControlClient, list[dict[str, Any]]]
) -> None:
    client, replies = mt
    points = _day_of_points()
    client.heartbeat(_stats(points, 1))
    old = plane.stored(client.component_id or "")

    # A gap: the server applies a report whose answer is lost, so the client's base is behind.
    def lose(response: httpx.Response) -> None:
        raise httpx.ReadError("answer lost")

    plane.http.event_hooks = {"response": [lose]}
    points["pair01"] = [*points["pair01"][1:], PointInfo(id="p1-a", kind="crash", time=7000.0, seq=2000)]
    with pytest.raises(httpx.ReadError):
        client.heartbeat(_stats(points, 2))
    plane.http.event_hooks = {"response": [lambda r: (r.read(), replies.append(r.json()))]}
    points["pair01"] = [*points["pair01"][1:], PointInfo(id="p1-b", kind="crash", time=7001.0, seq=2001)]
    client.heartbeat(_stats(points, 3))
    assert replies[-1]["points_resync"] is True
    before = _sent(client)
    client.heartbeat(_stats(points, 4))
    assert _sent(client) - before == PAIRS * POINTS and replies[-1]["points_resync"] is False
    assert _lists(plane.stored(client.component_id or "")) == _expected(points)

    # The database restored from a backup: the server holds an older version than the base.
    with plane.cp.db.session() as s:
        row = s.get(Component, client.component_id)
        assert row is not None
        row.stats = old
    points["pair02"] = points["pair02"][3:]
    client.heartbeat(_stats(points, 5))
    assert replies[-1]["points_resync"] is True
    client.heartbeat(_stats(points, 6))
    assert replies[-1]["points_resync"] is False
    assert _lists(plane.stored(client.component_id or "")) == _expected(points)


def test_a_bad_delta_is_a_422_naming_the_field(
    plane: Plane, mt: tuple[ControlClient, list[dict[str, Any]]]
) -> None:
    client, _ = mt
    url = f"/api/components/{client.component_id}/heartbeat"
    headers = {"Authorization": f"Bearer {client._token}"}
    bad = [
        ({"base": -1, "pairs": {}}, "stats.points_delta.base"),
        (
            {"base": 1, "pairs": {"p": {"added": [{"id": "x", "kind": "crash", "time": 1.0, "seq": "7"}]}}},
            "stats.points_delta.pairs.p.added.0.seq",
        ),
        ({"base": 1, "pairs": {"../etc": {}}}, "stats.points_delta.pairs"),
        ({"base": 1, "pairs": {"p": {"removed": "all"}}}, "stats.points_delta.pairs.p.removed"),
        ({"base": 1, "pairs": {}, "extra": 1}, "stats.points_delta.extra"),
    ]
    for delta, field in bad:
        r = plane.http.post(url, json={"stats": {"points_seq": 2, "points_delta": delta}}, headers=headers)
        assert r.status_code == 422, (delta, r.text)
        body = r.json()
        fields = [p["detail"]["field"] for p in body.get("problems", [body])]
        assert any(f.startswith(field) for f in fields), (field, body)
    assert plane.stored(client.component_id or "") == {}  # nothing stored from a refused report
