"""Scale of the control plane: a heartbeat costs O(its own pairs), whatever the number of items,
and the desired state is sent only when it changed. Real API (in process), real database; costs
are counted (SQL statements, item rows loaded), never timed."""

from __future__ import annotations

import asyncio
import json
import random
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio.to_thread
import httpx
import pytest
from bench import pg
from bench.hollow import Hollow, agent_stats, machine_name, master_target_stats, seed
from fastapi.testclient import TestClient
from sqlalchemy import event, func, select, update

from siterecovery.config import load_server_config
from siterecovery.control.admission import HeartbeatAdmission, retry_after
from siterecovery.control.api.items import item_page, item_view
from siterecovery.dataplane.assignments import AgentDesired, AgentStats
from siterecovery.dataplane.control_client import FAST_INTERVAL, ControlClient, DesiredSource, Registration
from siterecovery.dr import monitor
from siterecovery.dr.bookmarks import request_bookmark
from siterecovery.dr.items import get_item
from siterecovery.dr.monitor import evaluate, read_inputs
from siterecovery.retry import after_busy as backoff_seconds
from siterecovery.server.app import create_app
from siterecovery.store import desired_epoch
from siterecovery.store.context import ControlPlane, open_control_plane
from siterecovery.store.database import Database
from siterecovery.store.events import record_event
from siterecovery.store.models import Component, Job, MasterTargetPoint, Policy, ReplicatedItem
from siterecovery.store.points import store_report
from siterecovery.store.record import ItemRecord
from siterecovery.store.states import Role, Severity
from siterecovery.store.tokens import create_token
from tests.conftest import require_postgres


@dataclass
class Counter:
    statements: int = 0
    items_loaded: int = 0
    sql: list[str] = field(default_factory=list)

    def reset(self) -> None:
        self.statements, self.items_loaded, self.sql = 0, 0, []


@pytest.fixture
def plane(tmp_path: Path) -> Iterator[tuple[ControlPlane, TestClient, Counter]]:
    cp = open_control_plane(load_server_config(tmp_path / "state"))
    counter = Counter()

    def on_statement(_c: Any, _cur: Any, statement: str, *_: Any) -> None:
        counter.statements += 1
        counter.sql.append(statement)

    def on_load(_target: Any, _ctx: Any) -> None:
        counter.items_loaded += 1

    event.listen(cp.db.engine, "before_cursor_execute", on_statement)
    event.listen(ReplicatedItem, "load", on_load)
    try:
        with TestClient(create_app()) as http:
            yield cp, http, counter
    finally:
        event.remove(ReplicatedItem, "load", on_load)
        event.remove(cp.db.engine, "before_cursor_execute", on_statement)
        cp.db.engine.dispose()


def _cost(component: Hollow, http: TestClient, counter: Counter) -> tuple[int, int]:
    counter.reset()
    assert component.heartbeat(http).status_code == 200
    return counter.statements, counter.items_loaded


def _cost_after_a_change(
    cp: ControlPlane, component: Hollow, http: TestClient, counter: Counter
) -> tuple[int, int]:
    """A heartbeat after something its desired state may read changed: it computes it again."""
    with cp.db.session() as s:
        desired_epoch.bump(s)
    return _cost(component, http, counter)


def test_a_heartbeat_touches_only_its_own_items(plane: tuple[ControlPlane, TestClient, Counter]) -> None:
    cp, http, counter = plane
    seed(cp, 10)  # vm00000..vm00009 through process-server-0 to master-target-0
    passphrase = cp.passphrase()
    vm = machine_name(0)
    agent = Hollow("agent", f"onprem/{vm}", [f"{vm}-g1-d0", f"{vm}-g1-d1"])
    mt = Hollow("master-target", "master-target-0", [], points_per_pair=5)
    ps = Hollow("process-server", "process-server-0", [])
    for c in (agent, mt, ps):
        c.register(http, passphrase)
        c.heartbeat(http)
    few = {c.kind: _cost_after_a_change(cp, c, http, counter) for c in (agent, mt, ps)}
    assert few["agent"][1] == 1 and few["master-target"][1] == 10  # its own items, nothing else
    # An agent's heartbeat computing its desired state: the epoch read, its row written, its
    # row's desired columns, its items, the addresses they name (one statement), their policy,
    # the revoked serials. Its token is remembered (`store.tokens.TokenCache`), so not read again.
    assert few["agent"][0] <= 7, counter.sql
    # Idle (nothing changed since its last heartbeat): the epoch read and the liveness write for
    # an agent, no item at all for any of them.
    for c in (agent, mt, ps):
        c.heartbeat(http)
    idle = {c.kind: _cost(c, http, counter) for c in (agent, mt, ps)}
    assert idle["agent"] == (2, 0), counter.sql
    assert all(loaded == 0 for _, loaded in idle.values()), idle

    seed(cp, 190, start=10, first_component=1)  # others' items: another process server and master target
    many = {c.kind: _cost_after_a_change(cp, c, http, counter) for c in (agent, mt, ps)}
    assert many == few, (few, many)
    for c in (agent, mt, ps):
        c.heartbeat(http)
    assert {c.kind: _cost(c, http, counter) for c in (agent, mt, ps)} == idle


def test_an_idle_master_target_heartbeat_writes_no_point_whatever_it_holds(
    plane: tuple[ControlPlane, TestClient, Counter],
) -> None:
    """A master target's points are rows (`store.points`): its heartbeat with an empty delta runs
    the same statements with the same amount of data (before, the whole lists were decoded and
    written back inside its stats), none of them on the points, for 5 or 200 points per pair;
    the API still shows the lists it reported."""
    cp, http, counter = plane
    passphrase = cp.passphrase()
    with cp.db.session() as s:
        reader = {"Authorization": f"Bearer {create_token(s, 'reader', Role.READER)}"}

    sent: list[int] = []  # characters of the statements' parameters: the data read back or written

    def on_statement(_c: Any, _cur: Any, _statement: str, parameters: Any, *_: Any) -> None:
        sent.append(len(repr(parameters)))

    def idle_cost(name: str, points_per_pair: int) -> tuple[int, list[str], int]:
        mt = Hollow("master-target", name, [f"{name}-p{i}" for i in range(4)])
        mt.register(http, passphrase)
        auth = {"Authorization": f"Bearer {mt.token}"}
        url = f"/api/components/{mt.component_id}/heartbeat"
        full = {**master_target_stats(mt.pairs, 7, points_per_pair), "points_seq": 1}
        r = http.post(url, json={"stats": full}, headers=auth)
        assert r.status_code == 200 and r.json()["points_seq"] == 1 and not r.json()["points_resync"]
        shown = http.get(f"/api/servers/{mt.component_id}", headers=reader).json()["stats"]
        assert shown["pairs"] == full["pairs"]  # as reported, points included
        idle = {
            **full,
            "pairs": [{**p, "points": []} for p in full["pairs"]],
            "points_seq": 2,
            "points_delta": {"base": 1, "pairs": {}},
        }
        counter.reset()
        sent.clear()
        event.listen(cp.db.engine, "before_cursor_execute", on_statement)
        try:
            r = http.post(url, json={"stats": idle}, headers=auth)
        finally:
            event.remove(cp.db.engine, "before_cursor_execute", on_statement)
        assert r.status_code == 200 and r.json()["points_seq"] == 2 and not r.json()["points_resync"]
        statements, on_points, written = (
            counter.statements,
            [q for q in counter.sql if "mt_points" in q],
            sum(sent),
        )
        shown = http.get(f"/api/servers/{mt.component_id}", headers=reader).json()["stats"]
        assert [len(p["points"]) for p in shown["pairs"]] == [points_per_pair] * 4
        return statements, on_points, written

    few = idle_cost("master-target-few", 5)
    many = idle_cost("master-target-many", 200)
    assert few[1] == [] and many[1] == [], many[1]
    assert few[0] == many[0], (few, many)
    assert many[2] < few[2] + 100, (few, many)  # ids and times differ a little, not 4 x 195 points

    with cp.db.session() as s:  # a removed master target's points go with it
        admin = {"Authorization": f"Bearer {create_token(s, 'admin', Role.ADMIN)}"}
        assert s.scalar(select(func.count()).select_from(MasterTargetPoint)) == 4 * (5 + 200)
    assert http.delete("/api/servers/master-target-many", headers=admin).status_code == 200
    with cp.db.session() as s:
        assert s.scalar(select(func.count()).select_from(MasterTargetPoint)) == 4 * 5


def test_desired_is_sent_only_when_it_changed(plane: tuple[ControlPlane, TestClient, Counter]) -> None:
    cp, http, _ = plane
    inventory = seed(cp, 3)
    agent = Hollow("agent", f"onprem/{machine_name(1)}", [f"{machine_name(1)}-g1-d0"])
    agent.register(http, cp.passphrase())
    first = agent.heartbeat(http).json()
    assert [r["pair_id"] for r in first["desired"]["replications"]] == [
        f"{machine_name(1)}-g1-d0",
        f"{machine_name(1)}-g1-d1",
    ]
    again = agent.heartbeat(http).json()
    assert again["desired"] is None and again["desired_version"] == first["desired_version"]

    with cp.db.session() as s:  # the item changes: a bookmark is asked of its agent
        tag = request_bookmark(s, get_item(s, machine_name(1)))
    changed = agent.heartbeat(http).json()
    assert changed["desired_version"] != first["desired_version"]
    assert [b["tag"] for b in changed["desired"]["bookmarks"]] == [tag]

    # A component that does not say which version it holds always gets the desired state.
    agent.version = None
    assert agent.heartbeat(http).json()["desired"] == changed["desired"]
    assert agent.heartbeat(http).json()["desired"] is None

    # Another server process on the same database (its own engine and sessions: nothing of this
    # process's memory) changes a policy, then the process server's address: each shows at the
    # agent's next heartbeat (the desired epoch lives in the database, `store.desired_epoch`).
    other = Database(cp.db.url)
    try:
        with other.session() as s:
            policy = s.get(Policy, "scale-policy")
            assert policy is not None
            policy.crash_consistent_frequency_seconds = 2
        assert agent.heartbeat(http).json()["desired"]["crash_interval_seconds"] == 2
        with other.session() as s:
            ps = s.get(Component, inventory.process_servers[0])
            assert ps is not None
            ps.address = "192.0.2.7:9443"
        moved = agent.heartbeat(http).json()["desired"]
        assert {r["process_server"] for r in moved["replications"]} == {"192.0.2.7:9443"}
    finally:
        other.engine.dispose()


def test_the_component_client_keeps_the_desired_state_the_server_says_is_unchanged(
    plane: tuple[ControlPlane, TestClient, Counter], tmp_path: Path
) -> None:
    cp, _, _ = plane
    seed(cp, 2)
    replies: list[dict[str, Any]] = []

    def keep(response: httpx.Response) -> None:
        if response.url.path.endswith("/heartbeat"):
            response.read()
            replies.append(response.json())

    passphrase = cp.passphrase()
    client = ControlClient(
        "http://testserver", tmp_path / "agent", Registration("agent", f"onprem/{machine_name(0)}", "onprem")
    )
    (tmp_path / "agent").mkdir()
    client._http = TestClient(create_app())
    client.register(passphrase)
    client._http = TestClient(create_app())  # registering replaced it (pinned to the CA)
    client._http.event_hooks = {"response": [keep]}
    first = client.heartbeat(AgentStats())
    second = client.heartbeat(AgentStats())
    assert replies[0]["desired"] is not None and replies[1]["desired"] is None
    assert second == first and len(first["replications"]) == 2  # type: ignore[arg-type]
    client.close()


def test_an_idle_component_heartbeats_at_its_idle_interval_and_fast_after_a_change(
    plane: tuple[ControlPlane, TestClient, Counter], tmp_path: Path
) -> None:
    cp, _, _ = plane
    seed(cp, 2)
    client = ControlClient(
        "http://testserver", tmp_path / "agent", Registration("agent", f"onprem/{machine_name(0)}", "onprem")
    )
    (tmp_path / "agent").mkdir()
    client._http = TestClient(create_app())
    client.register(cp.passphrase())
    client._http = TestClient(create_app())
    told: list[str | None] = []  # the interval each heartbeat tells the server (`control.admission`)
    client._http.event_hooks = {"request": [lambda r: told.append(r.headers.get("X-Heartbeat-Interval"))]}
    source = DesiredSource(AgentDesired, tmp_path / "agent", client)
    source.exchange(AgentStats())
    assert source.pace(10.0) == FAST_INTERVAL  # its first desired state: something to do
    source.exchange(AgentStats())
    assert source.pace(10.0) == 10.0 and source.pace(10.0, busy=True) == FAST_INTERVAL
    source.exchange(AgentStats())
    assert told == [None, "2", "2"]
    source.pace(10.0)
    with cp.db.session() as s:  # a workflow asks something of it: the next exchange brings it
        request_bookmark(s, get_item(s, machine_name(0)))
    assert source.exchange(AgentStats()).bookmarks and source.pace(10.0) == FAST_INTERVAL
    source.exchange(AgentStats())
    assert source.pace(10.0) == 10.0
    client.close()


def test_backoff_after_a_busy_answer_follows_retry_after_with_jitter() -> None:
    rng = random.Random(7)
    waits = [backoff_seconds("3", rng) for _ in range(50)]
    assert all(3.0 <= w <= 6.0 for w in waits) and len({round(w, 3) for w in waits}) > 40
    assert 2.0 <= backoff_seconds(None, rng) <= 4.0 and 2.0 <= backoff_seconds("soon", rng) <= 4.0


def _report_everything(cp: ControlPlane, at: float) -> None:
    """Every seeded item's agent and master target report: captured 7, applied 7 (caught up)."""
    by_mt: dict[str, list[str]] = {}
    with cp.db.session() as s:
        for item in s.scalars(select(ReplicatedItem)):
            rep = ItemRecord.model_validate(item.details).replication
            assert rep is not None
            pairs = [p.pair_id for p in rep.pairs]
            by_mt.setdefault(rep.master_target, []).extend(pairs)
            name = f"onprem/{item.machine}"
            row = s.scalar(select(Component).where(Component.kind == "agent", Component.name == name))
            if row is None:
                row = Component(id=f"agent-{item.machine}", kind="agent", name=name)
                s.add(row)
            row.last_heartbeat = at
            row.stats = agent_stats(pairs, 7)
        for mt_id, pairs in by_mt.items():
            mt = s.get(Component, mt_id)
            assert mt is not None
            mt.stats, _ = store_report(s, mt, master_target_stats(pairs, 7, points_per_pair=20))


def test_a_monitor_pass_reads_with_a_fixed_number_of_statements(
    plane: tuple[ControlPlane, TestClient, Counter],
) -> None:
    """The read phase of a pass (items, every component's stats, open alerts) is a fixed number of
    statements whatever the number of items; the RPO it computes is stored for every item."""
    cp, _, counter = plane
    t0 = time.time()
    seed(cp, 10)
    _report_everything(cp, t0)

    def read_cost() -> int:
        counter.reset()
        with cp.db.session() as s:
            read_inputs(s)
        return counter.statements

    assert len(evaluate(cp, now=t0 + 5)) == 10
    few = read_cost()

    seed(cp, 190, start=10, first_component=1)
    _report_everything(cp, t0 + 5)
    rpos = evaluate(cp, now=t0 + 10)
    assert len(rpos) == 200 and all(4.9 <= r.seconds <= 5.1 for r in rpos)
    assert read_cost() == few, counter.sql
    with cp.db.session() as s:
        assert {i.rpo_seconds for i in s.scalars(select(ReplicatedItem))} == {5.0}


def test_an_idle_monitor_pass_costs_the_same_statements_for_10_or_200_items(
    plane: tuple[ControlPlane, TestClient, Counter],
) -> None:
    """The stall, refused-frame and unusable-point checks use the pass's one read: no query per
    item (before, each item read its agent's and master target's rows and cleared its alerts)."""
    cp, _, counter = plane
    t0 = time.time()

    def pass_cost(at: float) -> int:
        evaluate(cp, now=at)  # RPO stored; the next pass at the same time changes nothing
        counter.reset()
        assert evaluate(cp, now=at)
        return counter.statements

    seed(cp, 10)
    _report_everything(cp, t0)
    few = pass_cost(t0 + 5)
    seed(cp, 190, start=10, first_component=1)
    _report_everything(cp, t0 + 5)
    assert pass_cost(t0 + 10) == few, counter.sql


def test_a_pass_rewrites_an_items_rpo_only_when_it_moved_by_its_step(
    plane: tuple[ControlPlane, TestClient, Counter],
) -> None:
    """A caught-up item's RPO climbs a second per second between its agent's reports: a pass
    rewrites it only once it moved by `rpo_step` (2 % of the 900 s threshold: 18 s), in one
    statement for every item; before, every item's row was rewritten on every pass."""
    cp, _, counter = plane
    t0 = time.time()
    seed(cp, 10)
    _report_everything(cp, t0)
    assert monitor.rpo_step(900) == 18
    assert len(evaluate(cp, now=t0 + 5)) == 10

    def rewrites(at: float) -> list[str]:
        counter.reset()
        assert len(evaluate(cp, now=at)) == 10
        return [sql for sql in counter.sql if sql.startswith("UPDATE replicated_items")]

    assert rewrites(t0 + 6) == [] and rewrites(t0 + 22) == []
    assert len(rewrites(t0 + 23)) == 1  # 18 s since the RPO stored: every item, one statement
    with cp.db.session() as s:
        assert {i.rpo_seconds for i in s.scalars(select(ReplicatedItem))} == {23.0}


def test_the_first_passes_after_a_start_take_on_new_items_a_share_at_a_time(
    plane: tuple[ControlPlane, TestClient, Counter], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Items and agents' reports never seen before are read at most COLD_PER_PASS a pass (the
    first pass after a start met them all at once); every item is evaluated within a few."""
    cp, _, _ = plane
    monkeypatch.setattr(monitor, "COLD_PER_PASS", 4)
    t0 = time.time()
    seed(cp, 10)
    _report_everything(cp, t0)
    counts = [len(evaluate(cp, now=t0 + n)) for n in (1, 2, 3)]
    assert counts[0] <= 4 and counts[1] <= 8 and counts[2] == 10, counts


def test_a_pass_evaluates_only_the_items_whose_inputs_changed(
    plane: tuple[ControlPlane, TestClient, Counter],
) -> None:
    """At 200 items, after the first pass a pass evaluates only the items whose agent reported,
    whose own pairs moved in their master target's report, or whose crossing came: counted, O(changed)
    (before, every pass evaluated every item)."""
    cp, _, _ = plane
    t0 = time.time()
    seed(cp, 200)
    _report_everything(cp, t0)
    assert monitor.run_pass(cp, now=t0 + 1).evaluated == 200
    assert monitor.run_pass(cp, now=t0 + 2).evaluated == 0
    with cp.db.session() as s:  # one agent heartbeats: its item only
        s.execute(
            update(Component).where(Component.id == "agent-" + machine_name(7)).values(last_heartbeat=t0 + 2)
        )
    one = monitor.run_pass(cp, now=t0 + 3)
    assert (one.items, one.changed, one.evaluated) == (200, 1, 1)
    with cp.db.session() as s:  # one pair applies further in its master target's report
        item = s.scalars(select(ReplicatedItem).order_by(ReplicatedItem.id)).first()
        assert item is not None
        rep = ItemRecord.model_validate(item.details).replication
        assert rep is not None
        mt = s.get(Component, rep.master_target)
        assert mt is not None and mt.stats is not None
        stats = json.loads(json.dumps(mt.stats))
        moved = next(p for p in stats["pairs"] if p["pair_id"] == rep.pairs[0].pair_id)
        moved["applied_seq"] += 1
        mt.stats, _ = store_report(s, mt, stats)
    assert monitor.run_pass(cp, now=t0 + 4).evaluated == 1
    assert monitor.run_pass(cp, now=t0 + 5).evaluated == 0
    assert len(evaluate(cp, now=t0 + 5)) == 200  # every item's RPO is still known


def test_an_item_page_takes_one_worker_thread_hop(
    plane: tuple[ControlPlane, TestClient, Counter], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A page of items hops to a worker thread once (its read), not three times: the caller's role
    is checked on the event loop from what the edge found (before, two sync dependencies each
    waited for the thread pool under load). A component's token is still refused (403)."""
    cp, http, _ = plane
    seed(cp, 3)
    with cp.db.session() as s:
        token = create_token(s, "reader", Role.READER)
        component = create_token(s, "a component", Role.COMPONENT)
    hops: list[str] = []
    real = anyio.to_thread.run_sync

    async def counted(func: Any, *args: Any, **kwargs: Any) -> Any:
        hops.append(getattr(func, "__name__", repr(func)))
        return await real(func, *args, **kwargs)

    monkeypatch.setattr(anyio.to_thread, "run_sync", counted)
    for bearer in (token, component):  # the edge looks each token up once; then it is remembered
        http.get("/api/replicatedItems", params={"limit": 2}, headers={"Authorization": f"Bearer {bearer}"})
    hops.clear()
    r = http.get("/api/replicatedItems", params={"limit": 2}, headers={"Authorization": f"Bearer {token}"})
    assert r.status_code == 200 and len(r.json()) == 2
    assert len(hops) == 1, hops
    refused = http.get("/api/replicatedItems", headers={"Authorization": f"Bearer {component}"})
    assert refused.status_code == 403, refused.text


def test_list_routes_are_paged_and_filterable(plane: tuple[ControlPlane, TestClient, Counter]) -> None:
    cp, http, _ = plane
    seed(cp, 25, master_targets=2)
    with cp.db.session() as s:
        token = create_token(s, "reader", Role.READER)
        for n in range(7):
            record_event(s, Severity.INFO, "scale-test", f"event {n}", "replicatedItem", f"obj-{n % 2}")
    auth = {"Authorization": f"Bearer {token}"}

    names: list[str] = []
    params: dict[str, Any] = {"limit": 10, "details": "false"}
    pages = 0
    while True:
        r = http.get("/api/replicatedItems", params=params, headers=auth)
        assert r.status_code == 200 and len(r.json()) <= 10
        assert all(i["details"] == {} for i in r.json())
        names += [i["name"] for i in r.json()]
        pages += 1
        if "X-Next-After" not in r.headers:
            break
        assert 'rel="next"' in r.headers["Link"]
        params["after"] = r.headers["X-Next-After"]
    assert pages == 3 and names == [machine_name(n) for n in range(25)]

    mt1 = http.get("/api/replicatedItems", params={"server": "master-target-scale-1"}, headers=auth).json()
    assert [i["name"] for i in mt1] == [machine_name(n) for n in range(1, 25, 2)]
    assert mt1[0]["details"]["replication"]["master_target"] == "master-target-scale-1"
    shown = http.get(f"/api/replicatedItems/{mt1[0]['id']}", headers=auth).json()
    assert mt1[0] == shown  # the list writes each record as stored: the same item as its own route

    first = http.get("/api/events", params={"code": "scale-test", "limit": 4}, headers=auth)
    rest = http.get(
        "/api/events", params={"code": "scale-test", "after": first.headers["X-Next-After"]}, headers=auth
    )
    assert [e["message"] for e in first.json() + rest.json()] == [f"event {n}" for n in reversed(range(7))]
    assert "X-Next-After" not in rest.headers
    obj = http.get("/api/events", params={"object_id": "obj-1"}, headers=auth).json()
    assert [e["message"] for e in obj] == ["event 5", "event 3", "event 1"]

    with cp.db.session() as s:  # jobs: two created in the same instant page by id
        for n, at in enumerate([100.0, 200.0, 200.0, 300.0, 400.0]):
            s.add(Job(id=f"job-{n}", kind="scale", state="succeeded", created_at=at))
    seen: list[str] = []
    query: dict[str, Any] = {"kind": "scale", "limit": 2}
    while True:
        r = http.get("/api/jobs", params=query, headers=auth)
        seen += [j["id"] for j in r.json()]
        if "X-Next-After" not in r.headers:
            break
        query["after"] = r.headers["X-Next-After"]
    assert seen == ["job-4", "job-3", "job-2", "job-1", "job-0"]


def test_the_item_list_on_postgresql_writes_each_item_as_its_own_route_shows_it(tmp_path: Path) -> None:
    """The list's JSON is built by the database (`json_build_object` here, `json_object` on
    SQLite above): the same items, fields and records as `GET /api/replicatedItems/{id}`."""
    require_postgres()
    with pg.postgres(database="siterecovery") as url:
        cp = open_control_plane(load_server_config(tmp_path / "state", database_url=url))
        db = cp.db
        try:
            seed(cp, 3, master_targets=2)
            with db.session() as s:
                for n, rpo in ((0, None), (1, 1.5)):
                    named = ReplicatedItem.name == machine_name(n)
                    s.execute(update(ReplicatedItem).where(named).values(rpo_seconds=rpo))
            with db.session() as s:
                listed = item_page(s.connection(), 2)
                bare = item_page(s.connection(), 10, details=False)
                shown = {
                    r.name: item_view(r).model_dump(mode="json") for r in s.scalars(select(ReplicatedItem))
                }
        finally:
            db.engine.dispose()
    assert [name for name, _ in listed] == [machine_name(n) for n in range(3)]  # the page and one more
    items = [json.loads(text_) for _, text_ in listed]
    assert items == [shown[machine_name(n)] for n in range(3)]
    assert items[1]["rpo_seconds"] == 1.5 and items[0]["rpo_seconds"] is None and items[0]["details"]
    assert [json.loads(text_) for _, text_ in bare] == [{**i, "details": {}} for i in items]


def test_heartbeats_beyond_the_limit_are_delayed_then_answered_busy() -> None:
    """Admission is per route: with one slot taken, another heartbeat waits its bounded time and is
    answered 503 with Retry-After; other routes and the held heartbeat go through."""
    release = asyncio.Event()
    entered = asyncio.Event()

    async def fake_app(scope: Any, receive: Any, send: Any) -> None:  # a handler that holds its slot
        if scope["path"].endswith("/heartbeat"):
            entered.set()
            await release.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    admission = HeartbeatAdmission(fake_app, limit=1, max_wait=0.05)

    async def run() -> tuple[int, httpx.Response, int]:
        transport = httpx.ASGITransport(app=admission)
        async with httpx.AsyncClient(transport=transport, base_url="http://cs") as http:
            held = asyncio.create_task(http.post("/api/components/a/heartbeat"))
            await asyncio.wait_for(entered.wait(), 30)
            shed = await http.post("/api/components/b/heartbeat")
            agent = await http.post("/api/components/c/heartbeat", headers={"X-Heartbeat-Interval": "10"})
            other = await http.get("/api/servers")
            release.set()
            return (await held).status_code, shed, agent, other.status_code

    held, shed, agent, other = asyncio.run(run())
    assert (held, shed.status_code, agent.status_code, other) == (200, 503, 503, 200)
    assert shed.json()["code"] == "server-busy"
    # Retry-After: the caller's interval (5 s when it does not say), stretched by half the shed
    # fraction: 1 of 2 heartbeats shed, then 2 of 3.
    assert (shed.headers["Retry-After"], agent.headers["Retry-After"]) == ("7", "14")
    assert admission.shed == 2


def test_retry_after_is_the_callers_interval_stretched_by_shedding() -> None:
    assert [retry_after(10, 0.0), retry_after(10, 1.0), retry_after(5, 0.5), retry_after(None, 0.0)] == [
        10,
        15,
        7,
        5,
    ]
    assert (retry_after(0.01, 0.0), retry_after(1e9, 2.0)) == (1, 90)  # clamped to 1-60 s, then stretched


def test_the_portal_pages_through_items(plane: tuple[ControlPlane, TestClient, Counter]) -> None:
    cp, http, _ = plane
    seed(cp, 130)
    assert cp.initial_admin_token
    assert http.post("/signin", data={"token": cp.initial_admin_token, "next": "/items"}).status_code in (
        200,
        303,
    )
    first = http.get("/items")
    rows = re.findall(r'<tr data-item="(vm\d+)"', first.text)
    assert rows == [machine_name(n) for n in range(100)]
    after = re.search(r'href="/items\?after=([^"]+)" rel="next"', first.text)
    assert after is not None
    second = http.get(f"/items?after={after.group(1)}")
    assert re.findall(r'<tr data-item="(vm\d+)"', second.text) == [machine_name(n) for n in range(100, 130)]
    assert 'rel="next"' not in second.text
    assert http.get(f"/items/{machine_name(129)}").status_code == 200


def test_the_monitor_rereads_an_item_only_when_its_details_changed(
    plane: tuple[ControlPlane, TestClient, Counter],
) -> None:
    cp, _, counter = plane
    t0 = time.time()
    seed(cp, 3, master_targets=2)
    _report_everything(cp, t0)
    assert len(evaluate(cp, now=t0 + 1)) == 3
    counter.reset()
    with cp.db.session() as s:
        read_inputs(s)
    # No item's details were read again (what loads them: the route query, `id IN (...)`).
    reads_details = [q for q in counter.sql if "replicated_items.id IN" in q]
    assert counter.items_loaded == 0 and not reads_details, reads_details

    with cp.db.session() as s:  # a workflow moves vm00000 to the other master target
        item = get_item(s, machine_name(0))
        rec = ItemRecord.model_validate(item.details)
        assert rec.replication is not None
        rec.replication.master_target = "master-target-scale-1"
        item.details, rev = rec.model_dump(mode="json"), item.details_rev
        item.rpo_seconds = 99.0  # not a change of details
    with cp.db.session() as s:
        assert get_item(s, machine_name(0)).details_rev == rev + 1
        assert get_item(s, machine_name(1)).details_rev == 1
    # The other master target does not report vm00000's pairs: its RPO is now the item's age.
    rpos = {r.item: r for r in evaluate(cp, now=t0 + 3)}
    with cp.db.session() as s:
        moved = get_item(s, machine_name(0)).id
    assert rpos[moved].caught_up is False


def test_a_monitor_pass_decodes_only_the_reports_that_changed(
    plane: tuple[ControlPlane, TestClient, Counter], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each component's report is decoded once, then again only when what is stored changed."""
    cp, _, _ = plane
    t0 = time.time()
    seed(cp, 4, master_targets=2)
    _report_everything(cp, t0)
    decoded: list[str] = []

    def counting_loads(text: str) -> Any:
        decoded.append(text)
        return json.loads(text)

    monkeypatch.setattr(monitor, "decode_report", counting_loads)
    assert len(evaluate(cp, now=t0 + 1)) == 4
    first = len(decoded)
    assert first >= 6  # 4 agents and 2 master targets at least
    decoded.clear()
    assert len(evaluate(cp, now=t0 + 2)) == 4
    assert decoded == []  # nothing changed: nothing decoded

    with cp.db.session() as s:  # one agent reports a newer capture (its liveness time unchanged)
        row = s.scalar(select(Component).where(Component.name == f"onprem/{machine_name(1)}"))
        assert row is not None
        row.stats = agent_stats([p["pair_id"] for p in row.stats["pairs"]], 900)
    rpos = {r.item: r for r in evaluate(cp, now=t0 + 3)}
    assert len(decoded) == 1 and json.loads(decoded[0])["pairs"][0]["captured_seq"] == 900
    with cp.db.session() as s:
        assert rpos[get_item(s, machine_name(1)).id].caught_up is False
        assert rpos[get_item(s, machine_name(0)).id].caught_up is True
