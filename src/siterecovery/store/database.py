"""The engine and the session factory of the configuration server's database.

SQLite file by default (embedded), PostgreSQL by URL. Apart from the models (`store.models`) so
that every session keeps the item index (`store.item_index`, which needs the models) without
the models' module importing the index back.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import create_engine, event
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DisconnectionError
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
    engine = create_engine(url, pool_size=10, max_overflow=20)
    _ping_when_idle(engine)
    return engine


PING_AFTER_IDLE = 10.0  # seconds a pooled connection may rest before it is checked at checkout


def _ping_when_idle(engine: Engine) -> None:
    """Check a pooled connection at checkout only when it rested for `PING_AFTER_IDLE`.

    `pool_pre_ping` costs a round trip to PostgreSQL at every checkout: one per heartbeat batch,
    per API request, per monitor batch — on a saturated server each such round trip also waits
    for the backend to be scheduled. A connection used within the last seconds is as alive as a
    ping would find it; one that dies in use anyway (PostgreSQL restarted) fails its statement,
    and SQLAlchemy then drops every connection of the pool made before that moment, so the
    next checkouts connect afresh (a heartbeat is answered `server-busy` and retried).
    """

    @event.listens_for(engine, "checkin")
    def _rested_from(_dbapi_conn: Any, record: Any) -> None:
        record.info["rested_from"] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _ping(dbapi_conn: Any, record: Any, _proxy: Any) -> None:
        since = record.info.get("rested_from")  # none on a connection just made
        if since is None or time.monotonic() - since < PING_AFTER_IDLE:
            return
        try:
            alive = engine.dialect.do_ping(dbapi_conn)
        except Exception as exc:  # the driver's own error: the connection is gone
            raise DisconnectionError(f"pooled connection lost while idle: {exc}") from exc
        if not alive:
            raise DisconnectionError("pooled connection lost while idle")


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
