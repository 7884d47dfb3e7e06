"""The DR cycle the demo (and the end-to-end test) runs: enable → failover → commit → reprotect
(delta) → failback → change the point before commit → commit → re-protect, with the
crash-consistency oracle after every move.

Each step becomes a row: time, bytes changed (what the guest wrote since the disks last agreed)
against bytes sent, the worst RPO seen while protected, application downtime, and the oracle's
verdict.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from siterecovery.api_client import ApiError
from siterecovery.demo.environment import Environment
from siterecovery.lab.records import RECORD_SIZE
from siterecovery.lab.runtime import guest_status

JOB_TIMEOUT = 600.0
Progress = Callable[[str, dict[str, Any]], None]


class CycleError(RuntimeError):
    pass


@dataclass
class StepRow:
    step: str
    seconds: float
    bytes_changed: int | None = None
    bytes_sent: int | None = None
    rpo_held: float | None = None
    downtime: float | None = None
    oracle: str = ""
    job_id: str = ""

    @property
    def ok(self) -> bool:
        return not self.oracle.startswith("FAIL")


def _task_result(job: dict[str, Any], action_prefix: str) -> dict[str, Any]:
    for task in job["tasks"]:
        if task["action"].startswith(action_prefix):
            out: dict[str, Any] = job["result"].get(str(task["ordinal"]), {})
            return out
    return {}


def _verdict(result: dict[str, Any]) -> str:
    oracle = result.get("oracle") or {}
    if not oracle.get("observable", True):
        return "n/a"
    if oracle.get("ok"):
        if isinstance(oracle.get("filesystem"), dict):  # a VM guest: ext4 checked, files counted
            return f"pass ({oracle.get('records', 0)} files, e2fsck clean)"
        return f"pass ({oracle.get('records', 0)} records)"
    return f"FAIL: {oracle.get('reason', '?')}"


class Cycle:
    """Runs one machine through the whole cycle; `progress` sees every job poll (for progress bars)."""

    def __init__(
        self,
        env: Environment,
        machine: str = "web1",
        progress: Progress | None = None,
        pace: float = 1.0,
    ) -> None:
        self.env = env
        self.machine = machine
        self.progress = progress
        # How much the guest writes between steps (1.0: 32 or 64 records; a VM guest writes a
        # few files a second under TCG, so its tests ask for less).
        self.pace = pace
        self.rows: list[StepRow] = []
        self._rpo_max: float | None = None

    # ---- waiting --------------------------------------------------------------------------------

    def _sample_rpo(self) -> None:
        try:
            rpo = self.env.api.get(f"/api/replicatedItems/{self.machine}")["rpo_seconds"]
        except ApiError:
            return
        if rpo is not None:
            self._rpo_max = max(self._rpo_max or 0.0, float(rpo))

    def _some(self, records: int) -> int:
        return max(1, round(records * self.pace))

    def _records(self, site: str) -> int:
        status = guest_status(self.env.lab_dir, site, self.machine)
        return status.flushed if status is not None else 0

    def wait_records(self, site: str, records: int, timeout: float = 120.0) -> None:
        """Let the guest work (and RPO be measured) until it has flushed `records` log records."""
        deadline = time.monotonic() + timeout
        while self._records(site) < records:
            if time.monotonic() > deadline:
                raise CycleError(
                    f"the guest of {self.machine} did not write {records} records in {timeout:.0f} s"
                )
            self._sample_rpo()
            time.sleep(0.25)

    def wait_agent(self, site: str, timeout: float = 120.0) -> None:
        """AG-1: after a machine boots its agent takes a moment to register; wait for its first check-in."""
        found = self.env.fabric(site).discover().machine(self.machine)
        booted = found.boot_time if found is not None and found.boot_time else time.time()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for server in self.env.api.get("/api/servers"):
                age = server["heartbeat_age_seconds"]
                if (
                    server["name"] == f"{site}/{self.machine}"
                    and age is not None
                    and time.time() - age >= booted
                ):
                    return
            time.sleep(0.3)
        raise CycleError(f"the agent of {self.machine} ({site}) did not register in {timeout:.0f} s")

    def _job(self, step: str, path: str, body: dict[str, Any]) -> tuple[dict[str, Any], float]:
        started = time.monotonic()
        try:
            job_id = self.env.api.post(path, body)["job_id"]
        except ApiError as exc:
            raise CycleError(f"{step}: {exc.problems}") from exc
        deadline = started + JOB_TIMEOUT
        while True:
            job: dict[str, Any] = self.env.api.get(f"/api/jobs/{job_id}")
            if self.progress is not None:
                self.progress(step, job)
            if job["state"] in ("succeeded", "failed", "cancelled"):
                break
            if time.monotonic() > deadline:
                raise CycleError(f"{step}: job {job_id} did not finish in {JOB_TIMEOUT:.0f} s")
            time.sleep(0.3)
        if job["state"] != "succeeded":
            raise CycleError(f"{step}: job {job_id} {job['state']}: {job.get('error')}")
        return job, time.monotonic() - started

    # ---- steps ----------------------------------------------------------------------------------

    def _sync_step(self, step: str, path: str, body: dict[str, Any], changed: Callable[[], int]) -> None:
        """A (re)synchronisation; `changed` tells, once it ended, what the guest wrote that had to move."""
        job, seconds = self._job(step, path, body)
        sent = _task_result(job, "replication-sync").get("bytes_sent")
        self.rows.append(StepRow(step, seconds, changed(), sent, job_id=job["id"]))

    def _move_step(self, step: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """A failover, failback or point change; returns the oracle's verdict at the machine's start."""
        rpo, self._rpo_max = self._rpo_max, None
        if self.rows:
            self.rows[-1].rpo_held = rpo
        job, seconds = self._job(step, path, body)
        booted = _task_result(job, "start-recovery-machine")
        self.rows.append(
            StepRow(
                step,
                seconds,
                downtime=booted.get("downtime_seconds"),
                oracle=_verdict(booted),
                job_id=job["id"],
            )
        )
        verdict: dict[str, Any] = booted.get("oracle") or {}
        return verdict

    def run(self) -> None:
        env, m = self.env, self.machine
        api = env.api
        if not any(p["name"] == "demo" for p in api.get("/api/policies")):
            api.post("/api/policies", {"name": "demo"})
        onprem_disk = env.fabric("onprem").discover().machine(m)
        if onprem_disk is None:
            raise CycleError(f"the lab has no machine {m}")
        env.fabric("onprem").power_on(m)
        self.wait_agent("onprem")
        self.wait_records("onprem", self._some(32))
        self._sync_step(
            "enable + initial replication",
            "/api/replicatedItems",
            {"machine": m, "policy": "demo", "process_server": "ps-onprem", "master_target": "mt-cloud"},
            lambda: sum(os.stat(d.backing).st_blocks * 512 for d in onprem_disk.disks),
        )
        self.wait_records("onprem", self._records("onprem") + self._some(64))
        self._move_step(
            "planned failover to cloud",
            f"/api/replicatedItems/{m}/failover",
            {"point": "latest", "planned": True},
        )
        self._job("commit failover", f"/api/replicatedItems/{m}/commit", {})
        self.wait_agent("cloud")
        at_failover = self._records("cloud")
        self.wait_records("cloud", at_failover + self._some(64))  # the machine keeps working in the cloud
        self._sync_step(
            "reprotect cloud → on-premises (delta)",
            f"/api/replicatedItems/{m}/reprotect",
            {
                "master_target": "mt-linux",
                "process_server": "ps-cloud",
                "datastore": "ds-vmfs1",
                "retention_volume": env.retention_volume("mt-linux"),
            },
            lambda: (self._records("cloud") - at_failover) * RECORD_SIZE,
        )
        self.wait_records("cloud", self._records("cloud") + self._some(64))
        back = self._move_step(
            "failback to on-premises", f"/api/replicatedItems/{m}/failback", {"point": "latest"}
        )
        self.wait_records("onprem", self._records("onprem") + self._some(32))
        # Before commit the point can change: the machine boots again from the same point, and
        # everything it wrote meanwhile is undone, so its log ends exactly where it did at failback.
        again = self._move_step(
            "change point before commit", f"/api/replicatedItems/{m}/changePoint", {"point": "latest"}
        )
        if again.get("observable") and again.get("records") != back.get("records"):
            self.rows[
                -1
            ].oracle = (
                f"FAIL: {again.get('records')} records after the change, {back.get('records')} at failback"
            )
        self._job("commit failback", f"/api/replicatedItems/{m}/commit", {})
        self.wait_agent("onprem")
        at_failback = self._records("onprem")
        self.wait_records("onprem", at_failback + self._some(64))
        self._sync_step(
            "re-protect on-premises → cloud (delta)",
            f"/api/replicatedItems/{m}/reprotect",
            {
                "master_target": "mt-cloud",
                "process_server": "ps-onprem",
                "retention_volume": env.retention_volume("mt-cloud"),
            },
            lambda: (self._records("onprem") - at_failback) * RECORD_SIZE,
        )
        self.wait_records("onprem", self._records("onprem") + self._some(32))
        self.rows[-1].rpo_held = self._rpo_max
