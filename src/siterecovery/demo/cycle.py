"""The DR cycle the demo (and the end-to-end test) runs: enable → failover → commit → reprotect
(delta) → failback → commit → re-protect, with the crash-consistency oracle after every move.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from siterecovery.cli.client import Api, ApiError
from siterecovery.demo.environment import Environment

JOB_TIMEOUT = 600.0


@dataclass(frozen=True)
class StepResult:
    step: str
    job: dict[str, Any]
    seconds: float


class CycleError(RuntimeError):
    pass


def wait_job(
    api: Api,
    job_id: str,
    on_update: Callable[[dict[str, Any]], None] | None = None,
    timeout: float = JOB_TIMEOUT,
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        job: dict[str, Any] = api.get(f"/api/jobs/{job_id}")
        if on_update is not None:
            on_update(job)
        if job["state"] in ("succeeded", "failed", "cancelled"):
            return job
        if time.monotonic() > deadline:
            raise CycleError(f"job {job_id} did not finish in {timeout:.0f} s")
        time.sleep(0.3)


def wait_agent(env: Environment, site: str, machine: str, timeout: float = 60.0) -> None:
    """AG-1: after a machine boots its agent takes a moment to register; wait for its first check-in."""
    found = env.fabric(site).discover().machine(machine)
    booted = found.boot_time if found is not None and found.boot_time else time.time()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for server in env.api.get("/api/servers"):
            age = server["heartbeat_age_seconds"]
            if server["name"] == f"{site}/{machine}" and age is not None and time.time() - age >= booted:
                return
        time.sleep(0.3)
    raise CycleError(f"the agent of {machine} ({site}) did not register in {timeout:.0f} s")


def wait_guest_records(
    env: Environment, site: str, machine: str, records: int, timeout: float = 60.0
) -> None:
    from siterecovery.lab.runtime import guest_status

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = guest_status(env.lab_dir, site, machine)
        if status is not None and status.flushed >= records:
            return
        time.sleep(0.2)
    raise CycleError(f"the guest of {machine} did not write {records} records in {timeout:.0f} s")


class Cycle:
    """Runs one machine through the whole cycle; `on_update` sees every job poll (progress bars)."""

    def __init__(
        self,
        env: Environment,
        machine: str = "web1",
        on_update: Callable[[str, dict[str, Any]], None] | None = None,
    ) -> None:
        self.env = env
        self.machine = machine
        self.on_update = on_update
        self.results: list[StepResult] = []

    def _job(self, step: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
        started = time.monotonic()
        try:
            job_id = self.env.api.post(path, body)["job_id"]
        except ApiError as exc:
            raise CycleError(f"{step}: {exc.problems}") from exc
        job = wait_job(self.env.api, job_id, (lambda j: self.on_update(step, j)) if self.on_update else None)
        self.results.append(StepResult(step, job, time.monotonic() - started))
        if job["state"] != "succeeded":
            raise CycleError(f"{step}: job {job_id} {job['state']}: {job.get('error')}")
        return job

    def item(self) -> dict[str, Any]:
        out: dict[str, Any] = self.env.api.get(f"/api/replicatedItems/{self.machine}")
        return out

    def run(self) -> None:
        env, m = self.env, self.machine
        api = env.api
        if not any(p["name"] == "demo" for p in api.get("/api/policies")):
            api.post("/api/policies", {"name": "demo"})
        env.fabric("onprem").power_on(m)
        wait_agent(env, "onprem", m)
        wait_guest_records(env, "onprem", m, 32)
        self._job(
            "enable replication",
            "/api/replicatedItems",
            {"machine": m, "policy": "demo", "process_server": "ps-onprem", "master_target": "mt-cloud"},
        )
        wait_guest_records(env, "onprem", m, 96)
        self._job(
            "failover to cloud (planned)",
            f"/api/replicatedItems/{m}/failover",
            {"point": "latest", "planned": True},
        )
        self._job("commit failover", f"/api/replicatedItems/{m}/commit", {})
        wait_agent(env, "cloud", m)
        wait_guest_records(env, "cloud", m, 160)  # the machine keeps working in the cloud
        self._job(
            "reprotect cloud → on-premises",
            f"/api/replicatedItems/{m}/reprotect",
            {
                "master_target": "mt-linux",
                "process_server": "ps-cloud",
                "datastore": "ds-vmfs1",
                "retention_volume": env.retention_volume("mt-linux"),
            },
        )
        wait_guest_records(env, "cloud", m, 224)
        self._job("failback to on-premises", f"/api/replicatedItems/{m}/failback", {"point": "latest"})
        self._job("commit failback", f"/api/replicatedItems/{m}/commit", {})
        wait_agent(env, "onprem", m)
        self._job(
            "re-protect on-premises → cloud",
            f"/api/replicatedItems/{m}/reprotect",
            {
                "master_target": "mt-cloud",
                "process_server": "ps-onprem",
                "retention_volume": env.retention_volume("mt-cloud"),
            },
        )
