"""A master target's recovery points as rows (`store.points`, migration 0006_s17p).

Against real databases made by the store's Alembic migrations (SQLite; PostgreSQL too for the
deltas): the migration moves the lists held in `components.stats` into the table, and deltas
applied as rows give the very lists `dataplane.point_delta.apply` gives.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from bench import pg
from sqlalchemy import text

from siterecovery.dataplane.point_delta import apply, diff
from siterecovery.store import migrate
from siterecovery.store.database import Database
from siterecovery.store.models import Component
from siterecovery.store.points import point_lists, store_report, unusable_by_pair, with_points
from siterecovery.store.states import ComponentKind
from tests.conftest import require_postgres


def _point(n: int, unusable: str = "") -> dict[str, Any]:
    return {
        "id": f"pt{n}",
        "kind": "crash",
        "time": 1000.0 + n,
        "seq": n,
        "tag": f"t{n}",
        "unusable": unusable,
    }


def _pair(pair_id: str, points: list[dict[str, Any]]) -> dict[str, Any]:
    return {"pair_id": pair_id, "applied_seq": 9, "points": points}


def test_the_migration_moves_held_lists_into_rows(tmp_path: Path) -> None:
    db = Database(f"sqlite:///{tmp_path / 'store.sqlite'}")
    cfg = migrate.alembic_config(db.url)
    with db.engine.begin() as connection:
        cfg.attributes["connection"] = connection
        command.upgrade(cfg, "0005_lead")
    held = {"points_seq": 4, "pairs": [_pair("p1", [_point(1), _point(2, "damaged")]), _pair("p2", [])]}
    with db.engine.begin() as connection:
        connection.execute(
            text(
                "INSERT INTO components (id, kind, name, site, address, machine, registered_at, health,"
                " stats, desired) VALUES ('mt', 'master-target', 'mt', '', '', '', 0, 'normal', :stats, '{}')"
            ),
            {"stats": json.dumps(held)},
        )
    migrate.upgrade(db)
    with db.session() as s:
        row = s.get(Component, "mt")
        assert row is not None
        assert [p["points"] for p in row.stats["pairs"]] == [[], []]  # the JSON no longer holds them
        assert row.stats["points_seq"] == 4  # the version held is unchanged: deltas go on
        assert point_lists(s, "mt") == {"p1": [_point(1), _point(2, "damaged")]}
        assert with_points(s, row) == held
        assert unusable_by_pair(s) == {("mt", "p1"): ["damaged"]}
        # The monitor's read of unusable points goes through the partial index, not every point.
        plan = s.execute(text("EXPLAIN QUERY PLAN SELECT pair_id FROM mt_points WHERE unusable != ''")).all()
        assert "ix_mt_points_unusable" in str(plan), plan
    db.engine.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'store.sqlite'}"
        return
    require_postgres()
    with pg.postgres(max_connections=20, database="siterecovery") as found:
        yield found


def test_deltas_as_rows_give_the_lists_the_master_target_holds(url: str) -> None:
    db = Database(url)
    migrate.upgrade(db)
    lists = {"p1": [_point(n) for n in range(5)], "p2": [_point(n) for n in range(3)]}
    with db.session() as s:
        s.add(Component(id="mt", kind=ComponentKind.MASTER_TARGET, name="mt"))
    with db.session() as s:
        row = s.get(Component, "mt")
        assert row is not None
        report = {"points_seq": 1, "pairs": [_pair(k, v) for k, v in lists.items()]}
        row.stats, resync = store_report(s, row, report)
        assert not resync
    steps = [
        {"p1": [*lists["p1"][2:], _point(5), _point(6)], "p2": lists["p2"]},  # thinned and appended
        {"p1": [_point(2, "journal record 3 is damaged"), *lists["p1"][3:], _point(5)], "p2": []},  # changed
        {"p1": [_point(9), _point(2)]},  # not an append: replaced; p2 no longer reported
    ]
    held = lists
    for seq, new in enumerate(steps, start=2):
        changes = {k: diff(held.get(k, []), v) for k, v in new.items() if held.get(k, []) != v}
        assert {k: apply(held.get(k, []), c) for k, c in changes.items()} == {
            k: v for k, v in new.items() if k in changes
        }
        report = {
            "points_seq": seq,
            "pairs": [_pair(k, []) for k in new],
            "points_delta": {"base": seq - 1, "pairs": changes},
        }
        with db.session() as s:
            row = s.get(Component, "mt")
            assert row is not None
            row.stats, resync = store_report(s, row, report)
            assert not resync
        with db.session() as s:
            assert point_lists(s, "mt") == {k: v for k, v in new.items() if v}
        held = new
    with db.session() as s:  # a delta on another base is not applied: the lists stay, resync asked
        row = s.get(Component, "mt")
        assert row is not None
        stale = {
            "points_seq": 9,
            "pairs": [_pair("p1", [])],
            "points_delta": {"base": 7, "pairs": {"p1": {"replace": []}}},
        }
        row.stats, resync = store_report(s, row, stale)
        assert resync and row.stats["points_seq"] == 0
        assert point_lists(s, "mt") == {"p1": held["p1"]}
    db.engine.dispose()
