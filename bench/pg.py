"""A throwaway PostgreSQL cluster on loopback for the benches and the tests (tests/control's
`postgres` fixture starts it through here): initdb as the `postgres` user in a temporary directory,
one database, stopped and deleted on exit."""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

from sqlalchemy import create_engine, text
from sqlalchemy.pool import NullPool


def pg_bin(tool: str) -> str:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{tool}"))
    if not found:
        raise RuntimeError("PostgreSQL is not installed (make system-deps installs it)")
    return found[-1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def postgres(max_connections: int = 200, database: str = "sr", statements: bool = False) -> Iterator[str]:
    """Yields a SQLAlchemy URL of a fresh database; the cluster is gone afterwards. With
    `statements` the cluster loads pg_stat_statements (a measurement aid: `statement_calls`)."""
    user = pwd.getpwnam("postgres")
    # Outside pytest's private (0700) temp tree, which the postgres user cannot enter.
    data = Path(tempfile.mkdtemp(prefix="siterecovery-pg-"))
    os.chown(data, user.pw_uid, user.pw_gid)
    port = _free_port()

    def as_postgres(*cmd: str) -> None:
        subprocess.run(
            ["runuser", "-u", "postgres", "--", *cmd], check=True, capture_output=True, timeout=120
        )

    as_postgres(pg_bin("initdb"), "-D", str(data), "-A", "trust", "-U", "sr")
    options = f"-p {port} -k {data} -c listen_addresses=127.0.0.1 -c max_connections={max_connections}"
    if statements:
        options += " -c shared_preload_libraries=pg_stat_statements"
    as_postgres(pg_bin("pg_ctl"), "-D", str(data), "-w", "-l", str(data / "log"), "-o", options, "start")
    try:
        psql = shutil.which("psql") or pg_bin("psql")

        def run_sql(on: str, sql: str) -> None:
            command = [psql, "-h", "127.0.0.1", "-p", str(port), "-U", "sr", "-d", on, "-c", sql]
            subprocess.run(command, check=True, capture_output=True, timeout=60)

        run_sql("postgres", f"create database {database}")
        if statements:
            run_sql(database, "create extension pg_stat_statements")
        yield f"postgresql+psycopg://sr@127.0.0.1:{port}/{database}"
    finally:
        as_postgres(pg_bin("pg_ctl"), "-D", str(data), "-m", "immediate", "stop")
        shutil.rmtree(data, ignore_errors=True)


def scratch_database(
    stack: ExitStack, database: str, prefix: str, statements: bool = False
) -> tuple[Path, str]:
    """A temporary work folder and a database URL: SQLite inside the folder, or a throwaway
    PostgreSQL cluster (`postgres`); both are removed when `stack` closes."""
    work = Path(tempfile.mkdtemp(prefix=prefix))
    stack.callback(shutil.rmtree, work, True)
    if database == "postgres":
        return work, stack.enter_context(postgres(statements=statements))
    return work, f"sqlite:///{work / 'state' / 'siterecovery.db'}"


def _ticks(pid: int | str) -> tuple[int, int, int]:
    """(ppid, own CPU ticks, reaped children's CPU ticks) of a process, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[1]), int(fields[11]) + int(fields[12]), int(fields[13]) + int(fields[14])


def cluster_cpu_seconds(url: str) -> float:
    """CPU time (user + system) used so far by the PostgreSQL cluster serving `url`: the
    postmaster, its live backends and the backends it has reaped."""
    engine = create_engine(url, poolclass=NullPool)
    try:
        with engine.connect() as conn:
            data = conn.execute(text("show data_directory")).scalar_one()
    finally:
        engine.dispose()
    postmaster = int((Path(data) / "postmaster.pid").read_text().split()[0])
    _, own, reaped = _ticks(postmaster)
    total = own + reaped
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid, ticks, _ = _ticks(entry.name)
            except (OSError, IndexError):  # gone meanwhile
                continue
            if ppid == postmaster:
                total += ticks
    return total / os.sysconf("SC_CLK_TCK")


def statement_calls(url: str) -> dict[str, int]:
    """Calls per statement text so far (pg_stat_statements; the cluster made with `statements`)."""
    engine = create_engine(url, poolclass=NullPool)
    try:
        with engine.connect() as conn:
            rows = conn.execute(
                text(
                    "select query, calls from pg_stat_statements where query not like '%pg_stat_statements%'"
                )
            ).all()
    finally:
        engine.dispose()
    found: dict[str, int] = {}
    for query, calls in rows:
        found[query] = found.get(query, 0) + int(calls)
    return found
