"""The configuration server on PostgreSQL (by URL): migrations, POL-1, and a durable job that
survives kill -9 — DBOS keeps its tables in its own schema of the same database."""

from __future__ import annotations

import glob
import json
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import IN_CI, free_port, run_cli
from tests.control.conftest import ConfigServer


def _pg_bin(tool: str) -> str:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{tool}"))
    if found:
        return found[-1]
    if IN_CI:
        pytest.fail("PostgreSQL is required in CI (make system-deps installs it)")
    pytest.skip("PostgreSQL not installed (make system-deps installs it)")


@pytest.fixture
def postgres() -> Iterator[str]:
    """A throwaway PostgreSQL cluster on loopback, run as the `postgres` user; yields a database URL."""
    initdb, pg_ctl = _pg_bin("initdb"), _pg_bin("pg_ctl")
    user = pwd.getpwnam("postgres")
    # Outside pytest's private (0700) temp tree, which the postgres user cannot enter.
    data = Path(tempfile.mkdtemp(prefix="siterecovery-pg-"))
    os.chown(data, user.pw_uid, user.pw_gid)
    port = free_port()

    def as_postgres(*cmd: str) -> None:
        subprocess.run(
            ["runuser", "-u", "postgres", "--", *cmd], check=True, capture_output=True, timeout=120
        )

    as_postgres(initdb, "-D", str(data), "-A", "trust", "-U", "sr")
    as_postgres(
        pg_ctl,
        "-D",
        str(data),
        "-w",
        "-l",
        str(data / "log"),
        "-o",
        f"-p {port} -k {data} -c listen_addresses=127.0.0.1",
        "start",
    )
    try:
        psql = shutil.which("psql") or _pg_bin("psql")
        subprocess.run(
            [
                psql,
                "-h",
                "127.0.0.1",
                "-p",
                str(port),
                "-U",
                "sr",
                "-d",
                "postgres",
                "-c",
                "create database siterecovery",
            ],
            check=True,
            capture_output=True,
            timeout=60,
        )
        yield f"postgresql+psycopg://sr@127.0.0.1:{port}/siterecovery"
    finally:
        as_postgres(pg_ctl, "-D", str(data), "-m", "immediate", "stop")
        shutil.rmtree(data, ignore_errors=True)


def test_server_on_postgresql_migrates_and_resumes_a_job_after_kill9(postgres: str, tmp_path: Path) -> None:
    cs = ConfigServer(
        state_dir=tmp_path / "state", port=free_port(), log=tmp_path / "server.log", database_url=postgres
    )
    cs.start()
    try:
        assert not (cs.state_dir / "siterecovery.db").exists()  # the database is PostgreSQL's
        run_cli("policies", "create", "gold", env=cs.env)
        assert cs.api("GET", "/api/policies/gold-failback").json()["rpo_threshold_minutes"] == 15
        assert cs.api("PATCH", "/api/policies/gold-failback", json={"retention_hours": 1}).status_code == 409

        out, started = tmp_path / "out.txt", tmp_path / "started"
        spec = tmp_path / "plan.json"
        spec.write_text(
            json.dumps(
                {
                    "groups": [
                        {
                            "items": [],
                            "actions_after": [
                                {"kind": "script", "name": "one", "command": f"echo one >> {out}"}
                            ],
                        },
                        {
                            "items": [],
                            "actions_after": [
                                {
                                    "kind": "script",
                                    "name": "two",
                                    "command": f"touch {started}; sleep 3; echo two >> {out}",
                                }
                            ],
                        },
                    ]
                }
            )
        )
        run_cli("plans", "create", "drill", "--file", str(spec), env=cs.env)
        job_id = json.loads(
            run_cli("-o", "json", "plans", "failover", "drill", "--no-wait", env=cs.env).stdout
        )["job_id"]
        deadline = time.monotonic() + 30
        while not started.exists():
            assert time.monotonic() < deadline
            time.sleep(0.05)
        cs.kill9()
        cs.start()
        job = cs.wait_job(job_id)
        assert job["state"] == "succeeded", job
        assert out.read_text() == "one\ntwo\n"
        assert [t["attempts"] for t in job["tasks"]] == [1, 2]
    finally:
        cs.stop()
