"""Recovery plans on the lab: boot groups in order, a manual action that pauses, resume (FW-5)."""

from __future__ import annotations

import time
from pathlib import Path

from siterecovery.demo.environment import Environment
from tests.conftest import run_cli
from tests.e2e.conftest import protect


def test_plan_runs_groups_in_order_and_pauses_for_the_manual_action(
    dr_env: Environment, tmp_path: Path
) -> None:
    protect(dr_env, "web1")
    protect(dr_env, "db1")
    spec = tmp_path / "plan.json"
    spec.write_text(
        '{"groups": [{"items": ["db1"], "actions_after": [{"kind": "manual", "name": "check the database",'
        ' "instructions": "confirm db1 answers"}]}, {"items": ["web1"]}]}'
    )
    run_cli("plans", "create", "shop", "--file", str(spec), env=dr_env.cli_env)
    job_id = dr_env.api.post("/api/recoveryPlans/shop/failover", {"planned": True})["job_id"]

    deadline = time.monotonic() + 120
    while (job := dr_env.api.get(f"/api/jobs/{job_id}"))["state"] != "paused":
        assert job["state"] in ("queued", "running"), job
        assert time.monotonic() < deadline
        time.sleep(0.2)
    # Group 1 is over, the manual action waits, group 2 has not started.
    assert dr_env.api.get("/api/replicatedItems/db1")["state"] == "failed-over"
    assert dr_env.api.get("/api/replicatedItems/web1")["state"] == "protected"
    names = [t["name"] for t in job["tasks"]]
    waiting = next(i for i, t in enumerate(job["tasks"]) if t["state"] == "waiting")
    assert names[waiting] == "Group 1: manual action: check the database"
    assert all(t["state"] == "succeeded" for t in job["tasks"][:waiting])
    assert all(t["state"] == "pending" for t in job["tasks"][waiting + 1 :])
    assert all(n.startswith("Group 1: db1") for n in names[:waiting])
    assert all(n.startswith("Group 2: web1") for n in names[waiting + 1 :])

    run_cli("jobs", "resume", job_id, env=dr_env.cli_env)
    watched = run_cli("jobs", "watch", job_id, env=dr_env.cli_env, timeout=180)
    assert "Group 2: web1" in watched.stdout
    job = dr_env.api.get(f"/api/jobs/{job_id}")
    assert job["state"] == "succeeded", job
    assert dr_env.api.get("/api/replicatedItems/web1")["state"] == "failed-over"
    ended = [t["ended_at"] for t in job["tasks"]]
    assert ended == sorted(ended)  # every task ran after the one before it
