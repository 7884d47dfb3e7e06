"""Several configuration-server processes on one database: who does the periodic work, and who
finishes the jobs of a process that died.

Every process serves the API and runs jobs (DBOS queues spread them, see `store.jobs`). The
periodic work — RPO monitor, scheduled bookmarks, rediscovery — must run once per interval in the
whole cluster, so exactly one process, the leader, does it:

- On PostgreSQL the leader is whoever holds a session-level advisory lock on a dedicated
  connection. When that process dies (even by kill -9) its connection closes, PostgreSQL releases
  the lock, and the next process to try takes it over within one interval. Each process also
  holds a lock of its own DBOS executor id while it lives; the leader looks for unfinished DBOS
  workflows whose executor's lock is free — a dead process — and re-enqueues them, so a job
  whose process died finishes on a survivor (DBOS runs every finished step only once).
- On SQLite there is one process (one writer per file); an exclusive `flock` next to the database
  makes a second process on the same file a follower instead of a second monitor.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import socket
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from dbos import DBOS
from sqlalchemy import text
from sqlalchemy.engine import Connection

from siterecovery.errors import Problem, SiteRecoveryError
from siterecovery.store.database import Database

log = logging.getLogger("siterecovery.cluster")

LEADER_LOCK = "siterecovery:periodic-work"
JOIN_TIMEOUT = 30.0
SQLITE_EXECUTOR = "local"  # one process per SQLite file: DBOS's default id, recovered at its start


def lock_key(name: str) -> int:
    """A stable signed 64-bit advisory-lock key for a name."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big", signed=True)


def default_executor_id(listen: str) -> str:
    """This process's DBOS executor id: `SITERECOVERY_NODE`, else host and listen address.

    Stable across restarts of the same instance, so a restarted process also recovers its own
    unfinished jobs at start (as a single server always did); unique per instance.
    """
    return os.environ.get("SITERECOVERY_NODE") or f"{socket.gethostname()}/{listen}"


@dataclass
class ClusterStatus:
    executor_id: str
    leader: bool
    periodic_passes: int
    recovered_executors: list[str]
    pass_seconds_p50: float | None  # over the last passes this process ran
    pass_seconds_max: float | None


class Cluster:
    """This process's membership: its liveness lock, and the leader lock when it holds it."""

    def __init__(self, db: Database, executor_id: str, lock_dir: Path) -> None:
        self.db = db
        self.postgres = db.engine.dialect.name == "postgresql"
        self.executor_id = executor_id if self.postgres else SQLITE_EXECUTOR
        self._lock_path = lock_dir / "leader.lock"
        self._conn: Connection | None = None
        self._file: IO[bytes] | None = None
        self._leader = False
        self._mutex = threading.Lock()
        self.periodic_passes = 0
        self.recovered_executors: list[str] = []
        self._pass_seconds: deque[float] = deque(maxlen=300)

    # --- PostgreSQL connection holding the locks -------------------------------------------------

    def _connection(self) -> Connection:
        if self._conn is None:
            conn = self.db.engine.connect().execution_options(isolation_level="AUTOCOMMIT")
            key = lock_key(f"executor:{self.executor_id}")
            deadline = time.monotonic() + JOIN_TIMEOUT
            # Briefly held by the leader checking whether we are dead, or by our own previous
            # incarnation until PostgreSQL notices its connection closed.
            while not conn.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": key}).scalar():
                if time.monotonic() > deadline:
                    conn.close()
                    raise SiteRecoveryError(
                        Problem(
                            "executor-id-in-use",
                            f"Another configuration-server process runs as {self.executor_id!r}.",
                            "Give each process its own name (SITERECOVERY_NODE, or a distinct --listen).",
                        )
                    )
                time.sleep(0.5)
            self._conn = conn
        return self._conn

    def _drop_connection(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            except Exception:  # already broken: closing is best effort
                log.debug("closing the lock connection failed", exc_info=True)
        self._conn, self._leader = None, False

    def join(self) -> None:
        """Take this process's liveness lock (PostgreSQL) before DBOS starts running jobs."""
        if self.postgres:
            self._connection()

    # --- leadership ------------------------------------------------------------------------------

    def is_leader(self) -> bool:
        """Whether this process should do the periodic work now (takes the lead when it is free)."""
        with self._mutex:
            was = self._leader
            try:
                self._leader = self._check_postgres() if self.postgres else self._check_file()
            except Exception:  # the database is away: not the leader until it is back
                log.warning("lost the connection holding the cluster locks", exc_info=True)
                self._drop_connection()
            if self._leader and not was:
                log.info(
                    "%s now does the periodic work (RPO monitor, bookmarks, rediscovery)", self.executor_id
                )
            elif was and not self._leader:
                log.warning("%s no longer does the periodic work", self.executor_id)
            return self._leader

    def _check_postgres(self) -> bool:
        conn = self._connection()
        if self._leader:
            conn.execute(text("SELECT 1"))  # a broken connection means the lock is gone too
            return True
        got = conn.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": lock_key(LEADER_LOCK)}).scalar()
        return bool(got)

    def _check_file(self) -> bool:
        if self._file is not None:
            return True
        f = open(self._lock_path, "ab")  # noqa: SIM115 - held open for the life of the process
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.close()
            return False
        self._file = f
        return True

    # --- jobs of dead processes ------------------------------------------------------------------

    def recover_dead_executors(self) -> list[str]:
        """Re-enqueue the unfinished jobs of every executor whose process is gone (leader only)."""
        if not self.postgres or not self._leader:
            return []
        pending = {
            w.executor_id for w in DBOS.list_workflows(status="PENDING", load_input=False, load_output=False)
        }
        dead = []
        with self._mutex:
            conn = self._connection()
            for executor in sorted(e for e in pending if e and e != self.executor_id):
                key = lock_key(f"executor:{executor}")
                if conn.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": key}).scalar():
                    conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": key})
                    dead.append(executor)
        for executor in dead:
            handles = DBOS._recover_pending_workflows([executor])
            log.warning("executor %s is gone: re-enqueued its %d unfinished jobs", executor, len(handles))
            self.recovered_executors.append(executor)
        return dead

    def passed(self, seconds: float) -> None:
        """One periodic pass ran here and took this long."""
        self.periodic_passes += 1
        self._pass_seconds.append(seconds)

    def status(self) -> ClusterStatus:
        recent = sorted(self._pass_seconds)
        return ClusterStatus(
            self.executor_id,
            self._leader,
            self.periodic_passes,
            list(self.recovered_executors),
            recent[len(recent) // 2] if recent else None,
            recent[-1] if recent else None,
        )

    def close(self) -> None:
        with self._mutex:
            self._drop_connection()
            if self._file is not None:
                self._file.close()
                self._file = None


_CURRENT: Cluster | None = None


def set_current(cluster: Cluster) -> None:
    global _CURRENT
    _CURRENT = cluster


def current_cluster() -> Cluster | None:
    return _CURRENT
