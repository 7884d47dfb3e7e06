"""The configuration server on PostgreSQL (by URL): migrations, POL-1, and a durable job that
survives kill -9 — DBOS keeps its tables in its own schema of the same database."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from bench import pg

from tests.conftest import free_port, require_postgres, run_cli
from tests.control.conftest import ConfigServer


@pytest.fixture
def postgres() -> Iterator[str]:
    """A throwaway PostgreSQL cluster on loopback, run as the `postgres` user; yields a database URL."""
    require_postgres()
    with pg.postgres(max_connections=100, database="siterecovery") as url:
        yield url


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

        out, started, release = tmp_path / "out.txt", tmp_path / "started", tmp_path / "release"
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
                                    # Until the test lets it go, after the kill (test_jobs).
                                    "command": f"touch {started}; while [ ! -e {release} ]; do "
                                    f"sleep 0.1; done; echo two >> {out}",
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
        deadline = time.monotonic() + 120
        while not started.exists():
            assert time.monotonic() < deadline
            time.sleep(0.05)
        cs.kill9()
        release.touch()
        cs.start()
        job = cs.wait_job(job_id)
        assert job["state"] == "succeeded", job
        assert out.read_text() == "one\ntwo\n"
        assert [t["attempts"] for t in job["tasks"]] == [1, 2]
    finally:
        cs.stop()
