"""Durable jobs: a job survives kill -9 of the server and does not redo finished tasks."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import run_cli
from tests.control.conftest import ConfigServer, running_config_server


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ConfigServer]:
    """One server for the tests that only run jobs of their own plans (a start costs seconds); the
    kill -9 test has a server of its own (`cs`), so no other job is in flight when it restarts."""
    with running_config_server(tmp_path_factory.mktemp("jobs")) as cs:
        yield cs


def _plan(cs: ConfigServer, tmp_path: Path, name: str, groups: list[dict[str, object]]) -> None:
    spec = tmp_path / f"{name}.json"
    spec.write_text(json.dumps({"groups": groups}))
    run_cli("plans", "create", name, "--file", str(spec), env=cs.env)


def test_two_step_job_survives_kill9_between_steps(cs: ConfigServer, tmp_path: Path) -> None:
    out, started, release = tmp_path / "out.txt", tmp_path / "step2-started", tmp_path / "release"
    _plan(
        cs,
        tmp_path,
        "drill",
        [
            {
                "items": [],
                "actions_after": [{"kind": "script", "name": "step one", "command": f"echo one >> {out}"}],
            },
            {
                "items": [],
                "actions_after": [
                    {
                        "kind": "script",
                        "name": "step two",
                        # Runs until the test lets it go (after the kill): a fixed sleep could
                        # end on a slow box before the kill, and step two then never ran twice.
                        "command": f"touch {started}; while [ ! -e {release} ]; do sleep 0.1; done; "
                        f"echo two >> {out}",
                    }
                ],
            },
        ],
    )
    job_id = json.loads(run_cli("-o", "json", "plans", "failover", "drill", "--no-wait", env=cs.env).stdout)[
        "job_id"
    ]
    deadline = time.monotonic() + 120
    while not started.exists():
        assert time.monotonic() < deadline, "step two never started"
        time.sleep(0.05)
    cs.kill9()
    release.touch()
    assert out.read_text() == "one\n"  # killed inside step two
    cs.start()
    job = cs.wait_job(job_id)
    assert job["state"] == "succeeded", job
    assert out.read_text() == "one\ntwo\n"  # step one did not run again
    attempts = [t["attempts"] for t in job["tasks"]]
    assert attempts == [1, 2]


def test_manual_action_pauses_until_resume(server: ConfigServer, tmp_path: Path) -> None:
    out = tmp_path / "out.txt"
    _plan(
        server,
        tmp_path,
        "ordered",
        [
            {
                "items": [],
                "actions_after": [
                    {"kind": "script", "name": "first", "command": f"echo 1 >> {out}"},
                    {"kind": "manual", "name": "switch DNS", "instructions": "do it"},
                ],
            },
            {
                "items": [],
                "actions_after": [{"kind": "script", "name": "second", "command": f"echo 2 >> {out}"}],
            },
        ],
    )
    job_id = json.loads(
        run_cli("-o", "json", "plans", "failover", "ordered", "--no-wait", env=server.env).stdout
    )["job_id"]
    job = server.wait_job(job_id, states=("paused",))
    assert [t["state"] for t in job["tasks"]] == ["succeeded", "waiting", "pending"]
    assert out.read_text() == "1\n"
    run_cli("jobs", "resume", job_id, env=server.env)
    watched = run_cli("jobs", "watch", job_id, env=server.env)
    assert "second" in watched.stdout
    assert out.read_text() == "1\n2\n"
    # Resuming a job that is not paused is a conflict, not a crash.
    again = run_cli("jobs", "resume", job_id, env=server.env, check=False)
    assert again.returncode == 2 and "job-not-paused" in again.stderr


def test_failing_script_fails_job_with_code(server: ConfigServer, tmp_path: Path) -> None:
    _plan(
        server,
        tmp_path,
        "broken",
        [{"items": [], "actions_after": [{"kind": "script", "name": "bad", "command": "echo nope; exit 3"}]}],
    )
    job_id = json.loads(
        run_cli("-o", "json", "plans", "failover", "broken", "--no-wait", env=server.env).stdout
    )["job_id"]
    job = server.wait_job(job_id)
    assert job["state"] == "failed"
    assert job["error"]["code"] == "script-failed"
    assert run_cli("jobs", "watch", job_id, env=server.env, check=False).returncode == 1


def test_cancel_a_paused_job(server: ConfigServer, tmp_path: Path) -> None:
    _plan(server, tmp_path, "waits", [{"items": [], "actions_after": [{"kind": "manual", "name": "wait"}]}])
    job_id = json.loads(
        run_cli("-o", "json", "plans", "failover", "waits", "--no-wait", env=server.env).stdout
    )["job_id"]
    server.wait_job(job_id, states=("paused",))
    run_cli("jobs", "cancel", job_id, env=server.env)
    assert server.api("GET", f"/api/jobs/{job_id}").json()["state"] == "cancelled"
