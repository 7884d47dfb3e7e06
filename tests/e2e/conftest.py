"""A whole embedded deployment (lab, configuration server, process servers, master targets,
agents) as real processes, shared by the end-to-end tests of one module.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from siterecovery.api_client import ApiError
from siterecovery.demo.cycle import Cycle
from siterecovery.demo.environment import Environment
from tests.conftest import require_tool, stop_environment

# Short enough that a stopped component counts as disconnected within a test (RP-PS, RP-REACH, CS-2).
HEARTBEAT_TIMEOUT = 4.0


@pytest.fixture(scope="module")
def dr_env(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Environment]:
    require_tool("qemu-img")  # the deployment itself needs no peer, but every e2e module compares disks
    env = Environment(
        tmp_path_factory.mktemp("dr"),
        # A module whose guests write for minutes sets DISK_SIZE: a full log writes no more records.
        disk_size=getattr(request.module, "DISK_SIZE", 16 << 20),
        env={
            "SITERECOVERY_HEARTBEAT_TIMEOUT": str(HEARTBEAT_TIMEOUT),
            "SITERECOVERY_SYNC_TIMEOUT": "120",
            "SITERECOVERY_DRAIN_TIMEOUT": "60",
        },
    )
    try:
        env.start()
        yield env
    finally:
        stop_environment(env)


def run_job(env: Environment, path: str, body: dict[str, Any], timeout: float = 180.0) -> dict[str, Any]:
    return wait_job(env, env.api.post(path, body)["job_id"], timeout)


def wait_job(env: Environment, job_id: str, timeout: float = 180.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        job: dict[str, Any] = env.api.get(f"/api/jobs/{job_id}")
        if job["state"] in ("succeeded", "failed", "cancelled"):
            return job
        assert time.monotonic() < deadline, f"job {job_id} still {job['state']}: {job['tasks']}"
        time.sleep(0.25)


def task_result(job: dict[str, Any], action: str) -> dict[str, Any]:
    """What the job's task `action` returned (a booted machine's oracle verdict, ...)."""
    task = next(t for t in job["tasks"] if t["action"] == action)
    result: dict[str, Any] = job["result"][str(task["ordinal"])]
    return result


def kill9_after_task(env: Environment, job_id: str, action: str, timeout: float = 60.0) -> None:
    """Once the job's task `action` succeeded, and the job runs on, kill -9 the configuration
    server and start it again (durable jobs resume where they were)."""
    deadline = time.monotonic() + timeout
    while True:
        job = env.api.get(f"/api/jobs/{job_id}")
        if next(t for t in job["tasks"] if t["action"] == action)["state"] == "succeeded":
            break
        assert job["state"] not in ("failed", "succeeded"), job
        assert time.monotonic() < deadline
        time.sleep(0.02)
    env.stop_server(kill=True)
    assert job["state"] == "running"  # killed in the middle of the job
    env.start_server()


def ensure_policy(env: Environment) -> None:
    if not any(p["name"] == "gold" for p in env.api.get("/api/policies")):
        env.api.post("/api/policies", {"name": "gold"})


def protect(env: Environment, machine: str, **extra: Any) -> dict[str, Any]:
    """Power the machine on, wait for its agent, enable replication; returns the enable job."""
    ensure_policy(env)
    env.fabric("onprem").power_on(machine)
    cycle = Cycle(env, machine)
    cycle.wait_agent("onprem")
    cycle.wait_records("onprem", 16)
    job = run_job(
        env,
        "/api/replicatedItems",
        {
            "machine": machine,
            "policy": "gold",
            "process_server": "ps-onprem",
            "master_target": "mt-cloud",
            **extra,
        },
    )
    assert job["state"] == "succeeded", job
    return job


def fail_over_and_commit(env: Environment, machine: str) -> None:
    """Protect a machine and move it to the cloud: the state every reprotect starts from."""
    protect(env, machine)
    job = run_job(env, f"/api/replicatedItems/{machine}/failover", {"planned": True})
    assert job["state"] == "succeeded", job
    assert run_job(env, f"/api/replicatedItems/{machine}/commit", {})["state"] == "succeeded"
    Cycle(env, machine).wait_agent("cloud")


def reprotect_body(env: Environment, **overrides: Any) -> dict[str, Any]:
    body = {
        "master_target": "mt-linux",
        "process_server": "ps-cloud",
        "datastore": "ds-vmfs1",
        "retention_volume": env.retention_volume("mt-linux"),
    }
    return {**body, **overrides}


def what_if(env: Environment, machine: str, **overrides: Any) -> list[str]:
    """The codes `reprotect --what-if` reports (a refusal before any check, e.g. CS-1, counts too)."""
    try:
        out = env.api.post(
            f"/api/replicatedItems/{machine}/reprotect", {**reprotect_body(env, **overrides), "what_if": True}
        )
    except ApiError as exc:
        return [str(p.get("code")) for p in exc.problems]
    return [str(p["code"]) for p in out["problems"]]


def lab_path(env: Environment) -> Path:
    return env.lab_dir
