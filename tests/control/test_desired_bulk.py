"""Every component's desired state built in one pass (`dr.desired_bulk`) on real PostgreSQL.

The bulk build must give each agent, process server and master target exactly what its own
build gives (`dr.desired.desired_for`), whatever its items hold; and heartbeats answered from
bulk builds keep the single path's promises: `desired` is not resent when unchanged, and a change
made through another server process shows at the next heartbeat. Compared and counted, never timed.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from bench import pg
from bench.hollow import Hollow, machine_name, seed
from fastapi.testclient import TestClient
from sqlalchemy import select
from sqlalchemy.orm import defer

from siterecovery.config import load_server_config
from siterecovery.control.api.components import COUNTS
from siterecovery.dr import desired_bulk
from siterecovery.dr.desired import desired_for
from siterecovery.dr.desired_bulk import desired_all
from siterecovery.server.app import create_app
from siterecovery.store import record
from siterecovery.store.context import ControlPlane, open_control_plane
from siterecovery.store.database import Database
from siterecovery.store.models import Component, ComponentCertificate, Policy, ReplicatedItem, now
from siterecovery.store.record import BookmarkRecord, EndedPair, HeldFailover, ItemRecord, Site
from siterecovery.store.states import ComponentKind
from tests.conftest import require_postgres


@pytest.fixture(scope="module")
def postgres_url() -> Iterator[str]:  # one cluster for the module: each test its own database
    require_postgres()
    with pg.postgres(max_connections=40, database="siterecovery") as url:
        yield url


@pytest.fixture
def plane(postgres_url: str, tmp_path: Path) -> Iterator[ControlPlane]:
    url = postgres_url.rsplit("/", 1)[0] + f"/t{uuid.uuid4().hex[:12]}"
    admin = Database(postgres_url)
    with admin.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as c:
        c.exec_driver_sql(f"create database {url.rsplit('/', 1)[1]}")
    admin.engine.dispose()
    cp = open_control_plane(load_server_config(tmp_path / "state", database_url=url))
    try:
        yield cp
    finally:
        cp.db.engine.dispose()


def _edit(cp: ControlPlane, machine: str, change: object) -> None:
    with cp.db.session() as s:
        item = s.scalars(select(ReplicatedItem).where(ReplicatedItem.name == machine)).one()
        rec = ItemRecord.model_validate(item.details)
        change(item, rec)  # type: ignore[operator]
        item.details = rec.model_dump(mode="json")


def test_the_bulk_build_gives_each_component_what_its_own_build_gives(plane: ControlPlane) -> None:
    cp = plane
    inv = seed(cp, 12, process_servers=2, master_targets=3)
    with cp.db.session() as s:
        s.add(
            Policy(
                id="fast-policy",
                name="fast",
                kind="replication",
                rpo_threshold_seconds=300,
                retention_seconds=3600,
                crash_consistent_frequency_seconds=2,
                app_consistent_frequency_seconds=0,
            )
        )
        for n in range(12):  # agents, with addresses; one machine has no agent row
            if n != 11:
                s.add(Component(id=f"agent-{n}", kind=ComponentKind.AGENT, name=f"onprem/{machine_name(n)}"))
        for n, cid in enumerate(inv.process_servers + inv.master_targets):
            row = s.get(Component, cid)
            assert row is not None
            row.address = f"192.0.2.{n + 1}:9443"
        mt = s.get(Component, inv.master_targets[1])
        assert mt is not None
        mt.desired = {"refresh": 3}
        s.add(Component(id="other-1", kind=ComponentKind.CONFIGURATION, name="vc", desired={"x": 1}))
        s.add(
            ComponentCertificate(
                serial="ab12",
                component_id="agent-3",
                kind=ComponentKind.AGENT,
                not_after=now() + 3600,
                revoked_at=now(),
            )
        )

    def second_machine(item: ReplicatedItem, rec: ItemRecord) -> None:  # vm00000's agent gets two items
        assert rec.replication is not None
        rec.replication.source_machine = machine_name(0)
        rec.replication.pairs = [
            p.model_copy(update={"pair_id": p.pair_id + "-b"}) for p in rec.replication.pairs
        ]
        item.policy_id = "fast-policy"

    def bookmarked(_: ReplicatedItem, rec: ItemRecord) -> None:
        rec.bookmarks = [BookmarkRecord(tag="t1", kind="app", requested_at=1.0, freeze=False)]
        assert rec.replication is not None
        rec.replication.points = {rec.replication.pairs[0].pair_id: "pt-9"}
        rec.ended_pairs = [
            EndedPair(
                master_target=inv.master_targets[2], process_server=inv.process_servers[1], pair_id="old-1"
            )
        ]

    def failed_over(_: ReplicatedItem, rec: ItemRecord) -> None:  # held, attached: replication gone
        assert rec.replication is not None
        rec.held = HeldFailover(replication=rec.replication, site=Site.CLOUD, machine="x", attached=True)
        rec.replication = None

    def tested(_: ReplicatedItem, rec: ItemRecord) -> None:
        rec.test = record.TestFailover(
            point="pt-1",
            machine="test-vm",
            copies=[record.TestCopy(request_id="r1", pair_id="p", point="pt-1", out_path="/t/x", label="d")],
        )

    _edit(cp, machine_name(5), second_machine)
    _edit(cp, machine_name(2), bookmarked)
    _edit(cp, machine_name(4), failed_over)
    _edit(cp, machine_name(7), tested)

    with cp.db.session() as s:
        bulk = desired_all(s)
        rows = list(s.scalars(select(Component).options(defer(Component.stats))))
        single = {r.id: desired_for(s, r) for r in rows if r.kind != ComponentKind.CONFIGURATION}
    assert bulk == single
    assert {r.kind for r in rows} >= {ComponentKind.AGENT, ComponentKind.PROCESS, ComponentKind.MASTER_TARGET}
    # The cases are really there (else the comparison proves little).
    two = bulk["agent-0"]
    assert len(two["replications"]) == 4 and two["crash_interval_seconds"] == 2
    assert bulk["agent-2"]["bookmarks"] and bulk["agent-3"]["revoked"] == ["ab12"]
    assert bulk["agent-4"]["replications"] == [] and bulk["agent-5"]["replications"] == []
    assert bulk[inv.master_targets[1]]["refresh"] == 3
    assert any(d["frozen"] for d in bulk[inv.master_targets[1]]["disks"])  # vm00004's held failover
    assert (
        "old-1" in bulk[inv.master_targets[2]]["discard"]
        and "old-1" in bulk[inv.process_servers[1]]["discard"]
    )
    assert bulk[inv.master_targets[1]]["copies"]  # vm00007's test copies
    relayed = [p for p in bulk[inv.process_servers[1]]["pairs"] if p["pair_id"].startswith(machine_name(5))]
    assert relayed and {p["agent"] for p in relayed} == {"agent-0"}  # the agent of its source now
    assert {p["agent"] for p in bulk[inv.process_servers[1]]["pairs"]} >= {""}  # vm00011 has no agent


def test_heartbeats_answered_from_bulk_builds_see_another_process_change(
    plane: ControlPlane, monkeypatch: pytest.MonkeyPatch
) -> None:
    cp = plane
    monkeypatch.setattr(desired_bulk, "BULK_MIN", 1)  # bulk from the first component met
    monkeypatch.setattr(desired_bulk, "SPACING", 0.0)  # and again at every new epoch
    inventory = seed(cp, 3)
    vm = machine_name(1)
    with TestClient(create_app()) as http:
        agent = Hollow("agent", f"onprem/{vm}", [f"{vm}-g1-d0"])
        agent.register(http, cp.passphrase())
        bulk = desired_bulk._bulk(cp.db.url)
        first = agent.heartbeat(http).json()
        assert bulk.epoch is not None, "the first heartbeat did not build in bulk"
        assert [r["pair_id"] for r in first["desired"]["replications"]] == [f"{vm}-g1-d0", f"{vm}-g1-d1"]
        again = agent.heartbeat(http).json()
        assert again["desired"] is None and again["desired_version"] == first["desired_version"]

        # Another server process (its own engine: nothing of this process's memory) changes a
        # policy, then the process server's address: each shows at the agent's next heartbeat.
        other = Database(cp.db.url)
        try:
            before = bulk.epoch
            with other.session() as s:
                policy = s.get(Policy, "scale-policy")
                assert policy is not None
                policy.crash_consistent_frequency_seconds = 2
            assert agent.heartbeat(http).json()["desired"]["crash_interval_seconds"] == 2
            assert bulk.epoch != before, "the change was not built in bulk"
            with other.session() as s:
                ps = s.get(Component, inventory.process_servers[0])
                assert ps is not None
                ps.address = "192.0.2.7:9443"
            moved = agent.heartbeat(http).json()["desired"]
            assert {r["process_server"] for r in moved["replications"]} == {"192.0.2.7:9443"}
            assert agent.heartbeat(http).json()["desired"] is None

            # Bulk states are kept until the first revoked serial they list expires (then the
            # list changes by time alone), at most KEEP_SECONDS.
            assert bulk.keep == desired_bulk.KEEP_SECONDS
            with other.session() as s:
                s.add(
                    ComponentCertificate(
                        serial="cd34",
                        component_id="gone",
                        kind=ComponentKind.AGENT,
                        not_after=now() + 300,
                        revoked_at=now(),
                    )
                )
            assert agent.heartbeat(http).json()["desired"]["revoked"] == ["cd34"]
            assert 0 < bulk.keep <= 300
        finally:
            other.engine.dispose()


def test_a_burst_of_new_components_is_built_in_bulk_with_their_tokens(
    plane: ControlPlane, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Many components registered at once (the desired epoch changed with each): the first
    heartbeat that misses its token loads every token (`control.api.warm`) and, the newcomers
    being more than BULK_MIN, builds every desired state in the same hop — no state built alone."""
    cp = plane
    monkeypatch.setattr(desired_bulk, "BULK_MIN", 2)
    seed(cp, 3)
    with TestClient(create_app()) as http:
        names = [machine_name(n) for n in range(3)]
        agents = [Hollow("agent", f"onprem/{vm}", [f"{vm}-g1-d0"]) for vm in names]
        for agent in agents:
            agent.register(http, cp.passphrase())
        loads, alone = COUNTS.token_loads, COUNTS.desired_alone
        replies = [agent.heartbeat(http) for agent in agents]
        assert [r.status_code for r in replies] == [200, 200, 200]
        assert all(r.json()["desired"]["replications"] for r in replies)
        assert (COUNTS.token_loads, COUNTS.desired_alone) == (loads + 1, alone)
