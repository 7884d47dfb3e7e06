"""Group commit of heartbeats: many components' reports, one transaction.

Every heartbeat writes (liveness, statistics, health). One transaction per heartbeat costs one
fsync each — about 5-15 ms on a shared disk — which caps a server at a few dozen heartbeats a
second however cheap the rest is. Here the request thread hands its report to one writer thread
per process and waits; the writer applies every report waiting at that moment in a single
transaction, commits once and releases them all. A heartbeat is still answered only after its
report is durable (as before), but while one batch commits the next one gathers, so throughput
grows with load instead of latency. A batch that fails is retried one report per transaction, so
one bad report fails alone.

Most reports are an agent's liveness and counters: those are written for the whole batch without
loading the rows; a report that can raise an event or change a row's health or address (process
servers, master targets, refused peers) is applied through its row (a batch of liveness reports
only needs no ORM session at all). Each batch also reads the desired epoch
(`store.desired_epoch`), which the heartbeat compares with the one its cached desired state was
computed under: one read serves every report of the batch, and it starts after each of them
arrived, so a change committed before a heartbeat arrived is seen by it. A request on the event
loop awaits its report with `record` (no worker thread waits for it); `write` blocks a worker
thread instead.

On PostgreSQL a batch of liveness reports is ONE statement in its own implicit transaction (one
round trip: no BEGIN, no COMMIT): the UPDATE of every row from arrays (`unnest`), the epoch read
in the same statement, and `synchronous_commit` off for that transaction only — its commit does
not wait for the WAL flush. What a crash can lose is the last few hundred milliseconds of
last-seen times and counters, which the next heartbeats (seconds later) write again; nothing else
is ever committed that way (docs/operations.md). On SQLite the same batch is an executemany.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from dataclasses import dataclass, field
from typing import Any

import pydantic_core
from sqlalchemy import bindparam, select, text, update
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session
from sqlalchemy.orm.attributes import set_committed_value

from siterecovery.config import ServerConfig
from siterecovery.control.heartbeats import COMPONENT_ALERTS, record_heartbeat
from siterecovery.errors import Problem, SiteRecoveryError, Status, not_found
from siterecovery.store import desired_epoch
from siterecovery.store.database import Database
from siterecovery.store.models import Component, DesiredEpoch, Event, now
from siterecovery.store.points import store_report
from siterecovery.store.states import ComponentKind

log = logging.getLogger("siterecovery.heartbeats")

MAX_BATCH = 500
WAIT_SECONDS = 30.0


@dataclass
class _Report:
    component_id: str
    kind: str
    stats: dict[str, Any]
    address: str | None
    done: threading.Event = field(default_factory=threading.Event)
    error: Exception | None = None
    points: Points | None = None
    epoch: int = 0
    # Set when an event-loop request awaits the report (`record`): resolved from the writer thread.
    awaited: tuple[asyncio.AbstractEventLoop, asyncio.Future[None]] | None = None

    def finish(self) -> None:
        self.done.set()
        if self.awaited is not None:
            loop, future = self.awaited
            loop.call_soon_threadsafe(_resolve, future)

    @property
    def liveness_only(self) -> bool:
        """An agent's report that can raise no event and changes no address: one UPDATE of many."""
        return self.kind == ComponentKind.AGENT and not self.address and not self.stats.get("refused_peers")


@dataclass(frozen=True)
class Points:
    """What the server now holds of a report whose point lists are versioned (a master target's)."""

    points_seq: int
    resync: bool  # the report's delta did not apply: the component must send its full lists


@dataclass(frozen=True)
class Recorded:
    """A committed report: its point lists' state (master targets) and the desired epoch read with it."""

    points: Points | None
    epoch: int


class HeartbeatWriter:
    """The writer thread of one database in this process."""

    def __init__(self, db: Database, config: ServerConfig) -> None:
        self.db = db
        self.config = config
        self._pending: list[_Report] = []
        self._cond = threading.Condition()
        self.batches = 0
        self._postgres = db.engine.dialect.name == "postgresql"
        self._store = _STORE_PG if self._postgres else _STORE_SQLITE
        self._thread = threading.Thread(target=self._run, name="heartbeat-writer", daemon=True)
        self._thread.start()

    @property
    def waiting(self) -> int:
        """Reports handed in and not yet taken into a batch."""
        with self._cond:
            return len(self._pending)

    def write(self, component_id: str, kind: str, stats: dict[str, Any], address: str | None) -> Recorded:
        """Record one heartbeat; returns once it is committed (raises what applying it raised)."""
        report = self._submit(_Report(component_id, kind, stats, address))
        if not report.done.wait(WAIT_SECONDS):
            raise _not_in_time()
        return self._outcome(report)

    async def record(
        self, component_id: str, kind: str, stats: dict[str, Any], address: str | None
    ) -> Recorded:
        """`write` for a request on the event loop: awaits the commit without holding a thread."""
        loop = asyncio.get_running_loop()
        report = _Report(component_id, kind, stats, address, awaited=(loop, loop.create_future()))
        assert report.awaited is not None
        self._submit(report)
        try:
            await asyncio.wait_for(asyncio.shield(report.awaited[1]), WAIT_SECONDS)
        except TimeoutError:
            raise _not_in_time() from None
        return self._outcome(report)

    def _submit(self, report: _Report) -> _Report:
        with self._cond:
            self._pending.append(report)
            self._cond.notify()
        return report

    def _outcome(self, report: _Report) -> Recorded:
        if isinstance(report.error, SiteRecoveryError):
            raise report.error
        if report.error is not None:
            # Not the report's fault (it was validated at the edge): the database refused the
            # write, e.g. another server process wrote the same master target's point rows at the
            # same moment, or SQLite stayed locked. The component retries, with jitter.
            log.warning("heartbeat of %s not recorded: %r", report.component_id, report.error)
            raise SiteRecoveryError(
                Problem(
                    "server-busy",
                    "The configuration server could not record this heartbeat "
                    f"({type(report.error).__name__}).",
                    "Retry after a few seconds (components do so with jitter).",
                ),
                Status.UNAVAILABLE,
            ) from report.error
        return Recorded(report.points, report.epoch)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._pending:
                    self._cond.wait()
                batch, self._pending = self._pending[:MAX_BATCH], self._pending[MAX_BATCH:]
            try:
                if all(r.liveness_only for r in batch) and self._postgres:
                    with self.db.engine.connect() as conn:
                        _liveness_statement(conn.execution_options(isolation_level="AUTOCOMMIT"), batch)
                elif all(r.liveness_only for r in batch):
                    with self.db.engine.begin() as conn:  # no ORM session needed
                        self._apply_quick(conn, batch)
                else:
                    with self.db.session() as s:
                        self._apply_all(s, batch)
            except Exception:  # one bad report must not fail the others: retry them one by one
                log.debug("heartbeat batch failed; applying its reports one at a time", exc_info=True)
                for report in batch:
                    try:
                        with self.db.session() as s:
                            self._apply_all(s, [report])
                    except Exception as exc:
                        report.error = exc
            self.batches += 1
            for report in batch:
                report.finish()

    def _apply_all(self, s: Session, batch: list[_Report]) -> None:
        self._apply_quick(s.connection(), batch)
        others = [r for r in batch if not r.liveness_only]
        if not others:
            return
        # The batch's process servers' and master targets' rows, and their open alerts, in one
        # statement each (not one round trip per report); their reports in one more.
        ids = sorted({r.component_id for r in others})
        rows = {c.id: c for c in s.scalars(select(Component).where(Component.id.in_(ids)))}
        alerts: dict[str, set[str]] = {}
        for object_id, code in s.execute(_OPEN_ALERTS, {"ids": ids}):
            alerts.setdefault(object_id, set()).add(code)
        at = now()
        written: dict[str, str | None] = {}
        for report in others:
            row = rows.get(report.component_id)
            if row is None:
                raise not_found("component", report.component_id)
            held = row.stats
            stats = self._apply(s, row, report, alerts.setdefault(row.id, set()), at)
            # An idle process server's report is often the one held: its liveness only.
            written[row.id] = pydantic_core.to_json(stats).decode() if stats != held else None
        # Liveness and the reports as JSON text, encoded once here (pydantic's serializer: the
        # ORM's `json.dumps` of a 200-pair report was a sixth of a master target's heartbeat), in
        # one statement per shape; the ORM's flush writes only a health or address that changed.
        stored = [{"cid": cid, "at": at, "st": t} for cid, t in written.items() if t is not None]
        beats = [{"cid": cid, "at": at} for cid, t in written.items() if t is None]
        conn = s.connection()
        if stored:
            conn.execute(self._store, stored)
        if beats:
            conn.execute(_BEAT, beats)

    def _apply(
        self, s: Session, row: Component, report: _Report, open_alerts: set[str], at: float
    ) -> dict[str, Any]:
        """One report through its row; returns the stats to store (with its liveness, at `at`)."""
        if report.address:
            row.address = report.address
        stats = report.stats
        if "points_seq" in stats:  # point lists versioned, maybe sent as a delta (`point_delta`)
            stats, resync = store_report(s, row, stats)  # the points go to their own rows
            report.points = Points(int(stats.get("points_seq", 0)), resync)
        record_heartbeat(s, row, stats, self.config, open_alerts, store_stats=False)
        # Written by `_store`/`_BEAT`, not by the ORM's flush.
        set_committed_value(row, "stats", stats)
        set_committed_value(row, "last_heartbeat", at)
        return stats

    @staticmethod
    def _apply_quick(conn: Connection, batch: list[_Report]) -> None:
        """The epoch for every report, and the liveness-only reports' UPDATE (in a transaction)."""
        # Read before the reports are applied: a desired state computed after this read reflects
        # every change committed before it (a change this batch makes, e.g. an address, gets the
        # epoch a new value when it commits, so the next heartbeat recomputes).
        quick = [r for r in batch if r.liveness_only]
        if quick and conn.dialect.name == "postgresql":
            _liveness_statement(conn, batch, durable=True)  # inside the batch's transaction
            return
        epoch = conn.execute(_EPOCH).scalar() or 0
        desired_epoch.note(str(conn.engine.url), epoch)
        if quick:
            at = now()
            # A component removed meanwhile matches no row; its heartbeat then fails on the
            # desired state (not found), as before.
            conn.execute(_LIVENESS, [{"cid": r.component_id, "at": at, "st": r.stats} for r in quick])
        for report in batch:
            report.epoch = epoch


_OPEN_ALERTS = select(Event.object_id, Event.code).where(
    Event.alert.is_(True),
    Event.active.is_(True),
    Event.object_type == "component",
    Event.code.in_(COMPONENT_ALERTS),
    Event.object_id.in_(bindparam("ids", expanding=True)),
)
# A report's stats as JSON text: cast on PostgreSQL, stored as it is by SQLite (JSON is text there).
_STORE_PG = text("UPDATE components SET last_heartbeat = :at, stats = CAST(:st AS json) WHERE id = :cid")
_STORE_SQLITE = text("UPDATE components SET last_heartbeat = :at, stats = :st WHERE id = :cid")
_BEAT = text("UPDATE components SET last_heartbeat = :at WHERE id = :cid")
_EPOCH = select(DesiredEpoch.value).where(DesiredEpoch.id == desired_epoch.EPOCH_ID)
_LIVENESS = (
    update(Component)
    .where(Component.id == bindparam("cid"))
    .values(last_heartbeat=bindparam("at"), stats=bindparam("st", type_=Component.stats.type))
)


# PostgreSQL: every liveness report of a batch in one UPDATE, and the epoch read in the same
# statement (the same snapshot: it sees every change committed before the statement started, as
# a separate read first would). A data-modifying WITH runs whether or not its rows are read.
# `set_config(..., true)` is SET LOCAL: with `durable` false it lasts for this statement's
# implicit transaction only, whose commit then does not wait for the WAL flush.
_LIVENESS_PG = text(
    """
    WITH beat AS (
        UPDATE components AS c SET last_heartbeat = :at, stats = CAST(v.st AS json)
        FROM unnest(CAST(:ids AS varchar[]), CAST(:sts AS text[])) AS v(id, st)
        WHERE c.id = v.id
    )
    SELECT (SELECT value FROM desired_epoch WHERE id = :epoch_id),
           CASE WHEN :durable THEN '' ELSE set_config('synchronous_commit', 'off', true) END
    """
)


def _liveness_statement(conn: Connection, batch: list[_Report], durable: bool = False) -> None:
    """The liveness-only reports of a batch and the epoch read, as one statement (PostgreSQL)."""
    quick = [r for r in batch if r.liveness_only]
    found = conn.execute(
        _LIVENESS_PG,
        {
            "at": now(),
            # A component removed meanwhile matches no row; its heartbeat then fails on the
            # desired state (not found), as before.
            "ids": [r.component_id for r in quick],
            "sts": [json.dumps(r.stats) for r in quick],
            "epoch_id": desired_epoch.EPOCH_ID,
            "durable": durable,
        },
    ).one()
    epoch = int(found[0] or 0)
    desired_epoch.note(str(conn.engine.url), epoch)
    for report in batch:
        report.epoch = epoch


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():  # the request may have given up (timed out) meanwhile
        future.set_result(None)


def _not_in_time() -> SiteRecoveryError:
    return SiteRecoveryError(
        Problem(
            "server-busy",
            "The configuration server could not record this heartbeat in time.",
            "Retry after a few seconds (components do so with jitter).",
        ),
        Status.UNAVAILABLE,
    )


_WRITERS: dict[int, HeartbeatWriter] = {}
_LOCK = threading.Lock()


def writer_for(db: Database, config: ServerConfig) -> HeartbeatWriter:
    with _LOCK:
        found = _WRITERS.get(id(db))
        if found is None or found.db is not db:
            found = _WRITERS[id(db)] = HeartbeatWriter(db, config)
        return found
