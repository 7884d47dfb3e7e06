"""The heartbeat writer's batches on PostgreSQL (`control.heartbeat_writer`).

A batch of agents' liveness reports is one statement in its own implicit transaction: the UPDATE
of every row from arrays and the desired epoch read together, `synchronous_commit` off for that
transaction only; and no checkout pings PostgreSQL unless its connection rested. A master
target's report touches its own row and the points that changed, whatever its number of pairs,
and a batch's process servers and master targets are loaded together. Real PostgreSQL, counted
statements and rows (never timed).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from bench import pg
from sqlalchemy import event, select, text

from siterecovery.config import load_server_config
from siterecovery.control.heartbeat_writer import HeartbeatWriter
from siterecovery.store import database, desired_epoch, migrate
from siterecovery.store.database import Database
from siterecovery.store.models import Component
from siterecovery.store.points import point_lists
from siterecovery.store.states import ComponentKind
from tests.conftest import require_postgres

AGENTS = 30
_KINDS = {"mt": ComponentKind.MASTER_TARGET, "ps": ComponentKind.PROCESS, "mt2": ComponentKind.MASTER_TARGET}


@pytest.fixture(scope="module")
def db() -> Iterator[Database]:  # one cluster for the module: each test uses its own rows
    require_postgres()
    with pg.postgres(max_connections=20, database="siterecovery") as url:
        found = Database(url)
        migrate.upgrade(found)
        with found.session() as s:
            for n in range(AGENTS):
                s.add(Component(id=f"a{n}", kind=ComponentKind.AGENT, name=f"a{n}"))
            for cid, kind in _KINDS.items():
                s.add(Component(id=cid, kind=kind, name=cid))
        try:
            yield found
        finally:
            found.engine.dispose()


@pytest.fixture
def statements(db: Database) -> Iterator[list[tuple[str, bool, bool]]]:
    """(statement, executemany, whether the driver's connection was in autocommit) per execute;
    a liveness statement's text ends with its `durable` parameter."""
    seen: list[tuple[str, bool, bool]] = []

    def on_statement(_c: Any, cursor: Any, statement: str, params: Any, _ctx: Any, many: bool) -> None:
        sql = " ".join(statement.split())
        if "unnest" in sql:
            sql += f" -- durable={params['durable']}"
        seen.append((sql, many, bool(cursor.connection.autocommit)))

    event.listen(db.engine, "before_cursor_execute", on_statement)
    yield seen
    event.remove(db.engine, "before_cursor_execute", on_statement)


def _writer(db: Database, tmp_path: Path) -> HeartbeatWriter:
    return HeartbeatWriter(db, load_server_config(tmp_path / "state", database_url=db.url))


def _wait_for(check: Any) -> None:
    for _ in range(6000):  # generous: up to 60 s on a loaded machine
        if check():
            return
        threading.Event().wait(0.01)
    raise AssertionError("condition not reached")


def _two_batches(
    db: Database, writer: HeartbeatWriter, statements: list[Any], second: list[str]
) -> dict[str, int]:
    """Agent a0's report alone in a first batch (held on its row lock), then `second` gathered
    into one batch; `statements` then holds the second batch's. The epoch each report got."""
    blocker = db.engine.connect()
    blocker.execute(text("UPDATE components SET name = name WHERE id = 'a0'"))
    done: dict[str, int] = {}

    def beat(cid: str) -> None:
        kind = _KINDS.get(cid, ComponentKind.AGENT)
        done[cid] = writer.write(cid, kind, {"captured": cid}, None).epoch

    first = threading.Thread(target=beat, args=("a0",))
    first.start()
    _wait_for(lambda: writer.waiting == 0 and any("unnest" in sql for sql, _, _ in statements))
    others = [threading.Thread(target=beat, args=(cid,)) for cid in second]
    for t in others:
        t.start()
    _wait_for(lambda: writer.waiting == len(second))
    statements.clear()
    blocker.rollback()
    blocker.close()
    for t in (first, *others):
        t.join(60)
    return done


def test_a_batch_of_liveness_reports_is_one_statement_that_reads_the_epoch(
    db: Database, statements: list[tuple[str, bool, bool]], tmp_path: Path
) -> None:
    writer = _writer(db, tmp_path)
    with db.session() as s:
        desired_epoch.bump(s)
        epoch = desired_epoch.read(s)
    done = _two_batches(db, writer, statements, [f"a{n}" for n in range(1, AGENTS)])
    assert writer.batches == 2

    # The second batch: 29 reports, ONE statement, no BEGIN/COMMIT of its own (autocommit).
    assert len(statements) == 1, statements
    sql, many, autocommit = statements[0]
    assert "unnest" in sql and "desired_epoch" in sql and sql.endswith("durable=False")
    assert not many and autocommit
    assert done == {f"a{n}": epoch for n in range(AGENTS)}  # every report got the epoch read
    with db.session() as s:
        rows = {c.id: c for c in s.scalars(select(Component).where(Component.kind == ComponentKind.AGENT))}
        assert {cid: c.stats for cid, c in rows.items()} == {
            f"a{n}": {"captured": f"a{n}"} for n in range(AGENTS)
        }
        assert all(c.last_heartbeat is not None for c in rows.values())
        # SET LOCAL: the pooled connection the writer used is back to durable commits.
        assert s.execute(text("SHOW synchronous_commit")).scalar() == "on"


def test_a_change_committed_elsewhere_shows_in_the_next_batchs_epoch(db: Database, tmp_path: Path) -> None:
    writer = _writer(db, tmp_path)
    before = writer.write("a1", ComponentKind.AGENT, {}, None).epoch
    other = Database(db.url)  # another server process's engine
    try:
        with other.session() as s:
            desired_epoch.bump(s)
            bumped = desired_epoch.read(s)
    finally:
        other.engine.dispose()
    assert bumped != before
    assert writer.write("a2", ComponentKind.AGENT, {}, None).epoch == bumped


def test_a_batch_with_other_reports_stays_durable(
    db: Database, statements: list[tuple[str, bool, bool]], tmp_path: Path
) -> None:
    """Only a liveness-only batch commits asynchronously; one with a master target's report never does."""
    writer = _writer(db, tmp_path)
    _two_batches(db, writer, statements, ["a3", "mt"])
    assert writer.batches == 2
    liveness = [sql for sql, _, _ in statements if "unnest" in sql]
    assert len(liveness) == 1 and liveness[0].endswith("durable=True"), statements
    assert not any(autocommit for _, _, autocommit in statements)
    with db.session() as s:
        assert {c.id: c.stats.get("captured") for c in s.scalars(select(Component))}["a3"] == "a3"


def _backend(db: Database) -> int:
    with db.engine.connect() as c:
        return int(c.execute(text("SELECT pg_backend_pid()")).scalar_one())


def _terminate(db: Database, pid: int) -> None:
    with db.engine.connect() as c:
        c.execute(text("SELECT pg_terminate_backend(:pid, 30000)"), {"pid": pid})


def test_a_pooled_connection_is_pinged_only_after_resting(
    db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No round trip of its own at every checkout (the batch above is the statement, nothing
    else): a connection is checked only when it rested `PING_AFTER_IDLE`, and one found dead
    then is replaced before the caller sees it."""
    monkeypatch.setattr(database, "PING_AFTER_IDLE", 3600.0)  # no rest is long enough
    own = Database(db.url)  # its own pool: one connection, the one just used
    try:
        pid = _backend(own)
        pings: list[int] = []
        ping = own.engine.dialect.do_ping
        monkeypatch.setattr(own.engine.dialect, "do_ping", lambda conn: pings.append(1) or ping(conn))
        assert _backend(own) == pid and pings == []  # used a moment ago: not pinged
        monkeypatch.setattr(database, "PING_AFTER_IDLE", 0.0)  # now every rest counts as long
        _terminate(db, pid)
        assert _backend(own) != pid and pings  # pinged, found dead, replaced: no error
    finally:
        own.engine.dispose()


def test_a_batchs_process_servers_and_master_targets_are_loaded_in_one_statement(
    db: Database, statements: list[tuple[str, bool, bool]], tmp_path: Path
) -> None:
    writer = _writer(db, tmp_path)
    _two_batches(db, writer, statements, ["a4", "ps", "mt2"])
    assert writer.batches == 2
    loads = [sql for sql, _, _ in statements if sql.startswith("SELECT components.id")]
    alerts = [sql for sql, _, _ in statements if sql.startswith("SELECT events")]
    updates = [(sql, many) for sql, many, _ in statements if sql.startswith("UPDATE components")]
    assert len(loads) == 1 and len(alerts) == 1, statements
    # Both reports' liveness and stats: one executemany (their health did not change: no other).
    assert len(updates) == 1 and "stats" in updates[0][0] and updates[0][1], statements
    with db.session() as s:
        rows = {c.id: c for c in s.scalars(select(Component).where(Component.id.in_(["ps", "mt2"])))}
        assert {cid: c.stats for cid, c in rows.items()} == {
            "ps": {"captured": "ps"},
            "mt2": {"captured": "mt2"},
        }
        assert all(c.last_heartbeat is not None for c in rows.values())


def _mt_report(pairs: int, seq: int, base: int | None, changed: int = 0) -> dict[str, Any]:
    """A master target's report: every pair applied further (all its pair stats change), its
    point lists as a delta from `base` in which `changed` pairs lose their first point and gain one."""
    report: dict[str, Any] = {
        "pairs": [
            {"pair_id": f"p{n}", "applied_seq": seq, "last_applied_time": 1000.0 + seq, "points": []}
            for n in range(pairs)
        ],
        "points_seq": seq,
        "attached_disks": pairs,
    }
    if base is None:
        for n, pair in enumerate(report["pairs"]):
            pair["points"] = [{"id": f"p{n}-{k}", "kind": "crash", "time": 1.0 + k, "seq": k} for k in (0, 1)]
    else:
        report["points_delta"] = {
            "base": base,
            "pairs": {
                f"p{n}": {
                    "removed": [f"p{n}-0"],
                    "added": [{"id": f"p{n}-{seq}", "kind": "crash", "time": 1.0 + seq, "seq": seq}],
                }
                for n in range(changed)
            },
        }
    return report


def test_a_master_targets_heartbeat_touches_its_row_and_the_changed_points_whatever_its_pairs(
    db: Database, tmp_path: Path
) -> None:
    """Statements and rows written by a master target's heartbeat do not grow with its pairs
    (10 or 200, every pair's applied sequence moving): its own row, plus two point rows (one
    removed, one added) per pair whose list changed."""
    writer = _writer(db, tmp_path)
    touched: list[tuple[str, int]] = []

    def on_statement(_c: Any, cursor: Any, statement: str, *_: Any) -> None:
        verb = statement.split(None, 1)[0].upper()
        if verb in ("UPDATE", "INSERT", "DELETE", "SELECT"):
            touched.append((verb, cursor.rowcount if verb != "SELECT" else 0))

    def heartbeat(cid: str, report: dict[str, Any]) -> tuple[int, int]:
        touched.clear()
        event.listen(db.engine, "after_cursor_execute", on_statement)
        try:
            recorded = writer.write(cid, ComponentKind.MASTER_TARGET, report, None)
        finally:
            event.remove(db.engine, "after_cursor_execute", on_statement)
        assert recorded.points is not None and not recorded.points.resync
        return len(touched), sum(n for _, n in touched)

    seen = {}
    for pairs in (10, 200):
        cid = f"mt-{pairs}"
        with db.session() as s:
            s.add(Component(id=cid, kind=ComponentKind.MASTER_TARGET, name=cid))
        heartbeat(cid, _mt_report(pairs, 2, None))  # the full lists: every point written
        idle = heartbeat(cid, _mt_report(pairs, 3, 2))
        moving = heartbeat(cid, _mt_report(pairs, 4, 3, changed=3))
        seen[pairs] = (idle, moving)
        with db.session() as s:
            row = s.get(Component, cid)
            assert row is not None and row.stats["pairs"][pairs - 1]["applied_seq"] == 4
            lists = point_lists(s, cid)
        assert [p["id"] for p in lists["p0"]] == ["p0-1", "p0-4"]
        assert [p["id"] for p in lists["p5"]] == ["p5-0", "p5-1"]
    assert seen[10] == seen[200], seen
    (_, idle_rows), (_, moving_rows) = seen[200]
    assert idle_rows == 1  # the component's row (liveness and stats, one UPDATE)
    assert moving_rows == idle_rows + 2 * 3
