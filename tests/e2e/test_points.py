"""Recovery points through the configuration server: list, app-consistent bookmark, test failover,
and failover to an older point (FW-2, FW-3)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from siterecovery.api_client import ApiError
from siterecovery.dataplane.master_target import JOURNAL_DIR
from siterecovery.demo.cycle import Cycle
from siterecovery.demo.environment import Environment
from tests.conftest import run_cli
from tests.e2e.conftest import kill9_after_task, protect, run_job, wait_job

# The module's guests write 64 records/s from its start; at 16 MiB (4,096 records) a loaded machine
# filled db1's log before the last test, which needs the recovered machine to write 20 more.
DISK_SIZE = 64 << 20


def _points(env: Environment, machine: str) -> list[dict[str, Any]]:
    out = run_cli("-o", "json", "points", "list", machine, env=env.cli_env)
    return list(json.loads(out.stdout))


def _wait_for(env: Environment, machine: str, ok: Any, timeout: float = 60.0) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while not ok(points := _points(env, machine)):
        assert time.monotonic() < deadline, points
        time.sleep(0.5)
    return points


def _booted(job: dict[str, Any], action: str) -> dict[str, Any]:
    task = next(t for t in job["tasks"] if t["action"] == action)
    result: dict[str, Any] = job["result"][str(task["ordinal"])]
    return result


def test_points_test_failover_and_failover_to_an_older_point(dr_env: Environment) -> None:
    protect(dr_env, "web1")
    points = _wait_for(dr_env, "web1", lambda ps: sum(p["kind"] == "crash" for p in ps) >= 2)
    assert points[0]["id"] == "latest"

    # An app-consistent point: the agent freezes the guest, inserts the bookmark, thaws it.
    tag = json.loads(run_cli("-o", "json", "items", "bookmark", "web1", env=dr_env.cli_env).stdout)["tag"]
    _wait_for(dr_env, "web1", lambda ps: any(p["id"] == tag and p["kind"] == "app" for p in ps))

    # Test failover at the app point: an isolated copy boots; the item stays protected.
    job = run_job(dr_env, "/api/replicatedItems/web1/failover", {"point": "latest-app", "test": True})
    assert job["state"] == "succeeded", job
    verdict = _booted(job, "start-test-machine")["oracle"]
    assert verdict["ok"] and verdict["quiesce_markers"], verdict  # the app point holds the quiesce marker
    assert dr_env.api.get("/api/replicatedItems/web1")["state"] == "protected"
    assert dr_env.fabric("cloud").discover().machine("web1-test") is not None
    assert run_job(dr_env, "/api/replicatedItems/web1/testCleanup", {})["state"] == "succeeded"
    assert dr_env.fabric("cloud").discover().machine("web1-test") is None

    # Failover to an older crash point: the recovered log is a clean prefix that ends earlier.
    Cycle(dr_env, "web1").wait_records("onprem", 200)
    # At least three crash points (newest first), so the one chosen is neither the newest nor the
    # oldest: the next test changes the point to an older one than this.
    listed = _wait_for(dr_env, "web1", lambda ps: sum(p["kind"] == "crash" for p in ps) >= 3, 120)
    crash = [p for p in listed if p["kind"] == "crash"]
    older = crash[len(crash) // 2]
    assert older["id"] != crash[-1]["id"]
    job = run_job(dr_env, "/api/replicatedItems/web1/failover", {"point": older["id"]})
    assert job["state"] == "succeeded", job
    applied = _booted(job, "apply-point")
    assert applied["point"] == older["id"]
    verdict = _booted(job, "start-recovery-machine")["oracle"]
    assert verdict["ok"], verdict
    latest_records = Cycle(dr_env, "web1")._records("onprem")
    assert 0 < verdict["records"] < latest_records


def test_recovery_point_changes_until_commit(dr_env: Environment) -> None:
    """FW-2: before commit the recovery point can still change. The recovery machine is reverted
    (everything it wrote since it booted is undone), the master target rolls its kept journal to
    the new point, and the machine boots again; after commit the point is final."""
    item = dr_env.api.get("/api/replicatedItems/web1")
    if item["state"] != "failed-over":
        pytest.fail("runs after the failover to an older point above, which leaves web1 failed over")
    first = item["details"]["failover_point"]["point"]
    booted = item["details"]["oracle"]["cloud"]["records"]
    listed = _points(dr_env, "web1")  # still listed: the journals are kept until commit
    assert first in [p["id"] for p in listed] and listed[0]["id"] == "latest"
    cycle = Cycle(dr_env, "web1")
    cycle.wait_records("cloud", booted + 40)  # the recovery machine writes its own records

    def change_to(point: str) -> dict[str, Any]:
        job_id = dr_env.api.post("/api/replicatedItems/web1/changePoint", {"point": point})["job_id"]
        # One job at a time per item: a second request while one runs is refused, nothing starts.
        with pytest.raises(ApiError) as busy:
            dr_env.api.post("/api/replicatedItems/web1/changePoint", {"point": point})
        assert busy.value.status == 409 and busy.value.problems[0]["code"] == "item-busy"
        assert job_id in busy.value.problems[0]["message"]
        job = wait_job(dr_env, job_id)
        assert job["state"] == "succeeded", job
        verdict: dict[str, Any] = _booted(job, "start-recovery-machine")["oracle"]
        assert verdict["ok"], verdict  # a clean prefix: nothing the machine wrote survives past it
        return verdict

    with pytest.raises(ApiError) as again:  # failing over again is not how a point changes
        dr_env.api.post("/api/replicatedItems/web1/failover", {"point": first})
    assert "items change-point web1" in again.value.problems[0]["remediation"]
    # The same point again: exactly the records the point held, none the machine wrote since.
    assert change_to(first)["records"] == booted
    cycle.wait_records("cloud", booted + 40)
    # An older point: the journal rolls further back over the undone writes. The test above chose
    # a crash point with at least one older crash point listed (points are listed newest first).
    ids = [p["id"] for p in listed]
    older = [p for p in listed[ids.index(first) + 1 :] if p["kind"] == "crash"][-1]
    assert change_to(older["id"])["records"] < booted
    # The newest point the master target had: forward again, past where the first failover stopped.
    newest = change_to("latest")["records"]
    assert newest > booted
    assert dr_env.api.get("/api/replicatedItems/web1")["details"]["failover_point"]["point"] == "latest"

    held = dr_env.api.get("/api/replicatedItems/web1")["details"]["held"]["replication"]
    volume = Path(dr_env.retention_volume("mt-cloud"))
    journals = [volume / JOURNAL_DIR / p["pair_id"] for p in held["pairs"]]
    assert all(j.is_dir() for j in journals), journals  # kept while the point could change
    assert run_job(dr_env, "/api/replicatedItems/web1/commit", {})["state"] == "succeeded"
    deadline = time.monotonic() + 120  # on the master target's next desired state (a heartbeat)
    while any(j.exists() for j in journals):  # the point is final: the master target drops them
        assert time.monotonic() < deadline, journals
        time.sleep(0.3)
    assert dr_env.fabric("cloud").discover().machine("web1").snapshots == ()  # type: ignore[union-attr]
    assert _points(dr_env, "web1") == []
    with pytest.raises(ApiError) as refused:
        dr_env.api.post("/api/replicatedItems/web1/changePoint", {"point": "latest"})
    assert refused.value.status == 409 and refused.value.problems[0]["code"] == "invalid-state"


def test_unknown_point_is_refused_before_anything_changes(dr_env: Environment) -> None:
    protect(dr_env, "db1")
    job = run_job(dr_env, "/api/replicatedItems/db1/failover", {"point": "no-such-point"})
    assert job["state"] == "failed" and job["error"]["code"] == "recovery-point-unavailable"
    item = dr_env.api.get("/api/replicatedItems/db1")
    assert item["state"] == "protected"  # replication kept going


def test_group_point_is_consistent_across_machines(dr_env: Environment) -> None:
    """FW-4 / RP-GROUP-MT: one tag across both machines of a replication group. db1's guest writes
    record n only after app1's wrote n, so at a common point db1's log never runs ahead of app1's."""
    dr_env.lab_set("machine", "win1", "os=linux", "guest_after=app1")
    protect(dr_env, "app1", group="g1")
    protect(dr_env, "win1", group="g1")
    Cycle(dr_env, "win1").wait_records("onprem", 64)
    tag = json.loads(run_cli("-o", "json", "items", "bookmark", "app1", env=dr_env.cli_env).stdout)["tag"]
    assert tag.startswith("group-")
    for machine in ("app1", "win1"):
        _wait_for(dr_env, machine, lambda ps: any(p["id"] == tag and p["kind"] == "group" for p in ps))
    verdicts = {}
    for machine in ("app1", "win1"):
        job = run_job(dr_env, f"/api/replicatedItems/{machine}/failover", {"point": tag, "test": True})
        assert job["state"] == "succeeded", job
        verdicts[machine] = _booted(job, "start-test-machine")["oracle"]
        assert verdicts[machine]["ok"], verdicts[machine]
        assert run_job(dr_env, f"/api/replicatedItems/{machine}/testCleanup", {})["state"] == "succeeded"
    assert 0 < verdicts["win1"]["records"] <= verdicts["app1"]["records"], verdicts


def test_group_changes_its_point_only_through_its_plan(dr_env: Environment, tmp_path: Path) -> None:
    """RP-GROUP-MT / FW-2: replication-group members run from one common point, so after a plan
    failover their point changes together, through the plan, to a group point both have."""
    if any(dr_env.api.get(f"/api/replicatedItems/{m}")["state"] != "protected" for m in ("app1", "win1")):
        pytest.fail("runs after the group point test above, which protects app1 and win1 in group g1")
    tag = next(p["id"] for p in _points(dr_env, "app1") if p["kind"] == "group")
    spec = tmp_path / "plan.json"
    spec.write_text('{"groups": [{"items": ["app1", "win1"]}]}')
    run_cli("plans", "create", "g1-plan", "--file", str(spec), env=dr_env.cli_env)
    assert run_job(dr_env, "/api/recoveryPlans/g1-plan/failover", {})["state"] == "succeeded"

    with pytest.raises(ApiError) as refused:
        dr_env.api.post("/api/replicatedItems/app1/changePoint", {"point": tag})
    assert refused.value.problems[0]["code"] == "group-point-via-plan"

    job = run_job(dr_env, "/api/recoveryPlans/g1-plan/change-point", {"point": tag})
    assert job["state"] == "succeeded", job
    booted = {
        t["name"].split(":")[1].strip(): job["result"][str(t["ordinal"])]["oracle"]
        for t in job["tasks"]
        if t["action"] == "start-recovery-machine"
    }
    assert booted["app1"]["ok"] and booted["win1"]["ok"], booted
    # At the group point the dependent machine's log never runs ahead of the one it follows.
    assert 0 < booted["win1"]["records"] <= booted["app1"]["records"], booted
    assert run_job(dr_env, "/api/recoveryPlans/g1-plan/commit", {})["state"] == "succeeded"


def test_point_change_survives_kill9_of_the_configuration_server(dr_env: Environment) -> None:
    """The point change is a durable job: killed after the revert, the configuration server resumes
    it without redoing finished tasks, and the machine still boots from exactly the point."""
    if dr_env.api.get("/api/replicatedItems/db1")["state"] != "protected":
        pytest.fail("runs after the unknown-point test above, which leaves db1 protected")
    job = run_job(dr_env, "/api/replicatedItems/db1/failover", {"point": "latest"})
    assert job["state"] == "succeeded", job
    booted = _booted(job, "start-recovery-machine")["oracle"]["records"]
    Cycle(dr_env, "db1").wait_records("cloud", booted + 20)

    job_id = dr_env.api.post("/api/replicatedItems/db1/changePoint", {"point": "latest"})["job_id"]
    kill9_after_task(dr_env, job_id, "revert-recovery-machine")
    job = wait_job(dr_env, job_id)
    assert job["state"] == "succeeded", job
    attempts = {t["action"]: t["attempts"] for t in job["tasks"]}
    for finished in ("failover-begin", "shutdown-source", "revert-recovery-machine"):
        assert attempts[finished] == 1, attempts
    assert _booted(job, "start-recovery-machine")["oracle"]["records"] == booted

    # Commit ends the pairs: the process server drops what it still cached for them.
    pairs = dr_env.api.get("/api/replicatedItems/db1")["details"]["held"]["replication"]["pairs"]
    caches = [dr_env.root / "components" / "ps-onprem" / "cache" / "cache" / p["pair_id"] for p in pairs]
    assert all(c.is_dir() for c in caches), caches
    assert run_job(dr_env, "/api/replicatedItems/db1/commit", {})["state"] == "succeeded"
    deadline = time.monotonic() + 120  # on the process server's next desired state (a heartbeat)
    while any(c.exists() for c in caches):
        assert time.monotonic() < deadline, caches
        time.sleep(0.3)
