"""State columns: enums in the code, the very same strings in the database (no data migration).

Against a real SQLite database made by the store's Alembic migrations, as the server makes it.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from alembic.script import ScriptDirectory
from sqlalchemy import select, text
from sqlalchemy.orm import Session

from siterecovery.store import migrate
from siterecovery.store.database import Database
from siterecovery.store.models import Event, Job, Policy, ReplicatedItem
from siterecovery.store.states import Direction, Health, JobState, PolicyKind, ProtectionState, Severity


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Database]:
    database = Database(f"sqlite:///{tmp_path / 'store.sqlite'}")
    migrate.upgrade(database)
    yield database
    database.engine.dispose()


def _item(s: Session, item_id: str, state: ProtectionState) -> None:
    s.add(
        Policy(
            id="pol-1",
            name="p",
            kind=PolicyKind.REPLICATION,
            rpo_threshold_seconds=60,
            retention_seconds=3600,
            app_consistent_frequency_seconds=0,
        )
    )
    s.add(
        ReplicatedItem(
            id=item_id,
            name=item_id,
            machine="web1",
            source_fabric_id="f1",
            target_fabric_id="f2",
            direction=Direction.FORWARD,
            state=state,
            policy_id="pol-1",
        )
    )


def test_the_migrations_live_in_the_store_and_reach_the_head(db: Database) -> None:
    scripts = ScriptDirectory.from_config(migrate.alembic_config(db.url))
    assert Path(scripts.dir) == Path(migrate.__file__).parent / "migrations"
    with db.engine.connect() as conn:
        stored = conn.execute(text("SELECT version_num FROM alembic_version")).scalar_one()
    assert stored == scripts.get_current_head()


def test_a_state_is_stored_as_its_string_and_read_back_as_the_enum(db: Database) -> None:
    with db.session() as s:
        _item(s, "item-1", ProtectionState.INITIAL_SYNC)
    with db.engine.connect() as conn:
        raw = conn.execute(text("SELECT state, direction, health FROM replicated_items")).one()
    assert tuple(raw) == ("initial-sync", "onprem-to-cloud", "normal")
    with db.session() as s:
        item = s.get(ReplicatedItem, "item-1")
        assert item is not None
        assert item.state is ProtectionState.INITIAL_SYNC
        assert item.direction is Direction.FORWARD and item.health is Health.NORMAL


def test_rows_written_before_the_enums_read_as_enums(db: Database) -> None:
    # What an older server stored (plain strings through SQL) is what this one reads.
    with db.engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO jobs (id, kind, target_type, target_id, target_name, state, params, result, "
                "error, created_at) VALUES ('job-1', 'failover', '', '', '', 'paused', '{}', '{}', '{}', 0)"
            )
        )
        conn.execute(
            text(
                "INSERT INTO events (time, severity, alert, active, code, message, object_type, object_id)"
                " VALUES (0, 'critical', 1, 1, 'rpo-exceeded', 'm', 'replicatedItem', 'item-1')"
            )
        )
    with db.session() as s:
        job = s.get(Job, "job-1")
        assert job is not None and job.state is JobState.PAUSED and not job.state.finished
        event = s.scalars(select(Event)).one()
        assert event.severity is Severity.CRITICAL


def test_queries_take_enums_or_strings_and_an_unknown_state_matches_nothing(db: Database) -> None:
    with db.session() as s:
        _item(s, "item-1", ProtectionState.PROTECTED)
    with db.session() as s:
        protected = ReplicatedItem.state == ProtectionState.PROTECTED
        assert list(s.scalars(select(ReplicatedItem.id).where(protected))) == ["item-1"]
        by_string = s.scalars(select(ReplicatedItem.id).where(ReplicatedItem.state.in_(["protected"])))
        assert list(by_string) == ["item-1"]
        unknown = s.scalars(select(ReplicatedItem.id).where(ReplicatedItem.state == "no-such-state"))
        assert list(unknown) == []
