"""The engine and the session factory of the configuration server's database.

SQLite file by default (embedded), PostgreSQL by URL. Apart from the models (`store.models`) so
that every session keeps the item index (`store.item_index`, which needs the models) without
the models' module importing the index back.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import create_engine, event
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker

from siterecovery.store import desired_epoch
from siterecovery.store.item_index import install


def make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        # Pool as large as PostgreSQL's: the API's threads, the heartbeat writer, the monitor.
        engine = create_engine(
            url, connect_args={"check_same_thread": False, "timeout": 30}, pool_size=10, max_overflow=20
        )

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
            # WAL lets the portal read while a job writes; busy_timeout rides out short locks.
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        return engine
    # Heartbeats are admitted 16 at a time (control.admission); jobs and the API need the rest.
    return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20)


class Database:
    def __init__(self, url: str) -> None:
        self.url = url
        self.engine = make_engine(url)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        install(self._sessions)
        desired_epoch.install(self._sessions)

    @contextmanager
    def session(self) -> Iterator[Session]:
        with self._sessions() as s, s.begin():
            yield s
