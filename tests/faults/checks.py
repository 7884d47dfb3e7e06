"""What every scenario ends with: a planned failover, then the writer's records on the recovered
disk — every record flushed before the shutdown, as a clean prefix."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from siterecovery.demo.environment import Environment
from tests.e2e.conftest import run_job
from tests.faults.conftest import DATA, MACHINE
from tests.faults.records import RecordWriter, Verdict, check_image


def data_pair(env: Environment) -> dict[str, Any]:
    """The writer's disk's pair, as the failed-over item keeps it (`held`) until commit."""
    item = env.api.get(f"/api/replicatedItems/{MACHINE}")
    pairs = item["details"]["held"]["replication"]["pairs"]
    pair: dict[str, Any] = next(p for p in pairs if p["disk"] == DATA)
    return pair


def fail_over_and_check(env: Environment, writer: RecordWriter) -> Verdict:
    """Stop the writer (it flushes), fail over (planned) and check the recovered data disk."""
    writer.stop()
    job = run_job(env, f"/api/replicatedItems/{MACHINE}/failover", {"planned": True})
    assert job["state"] == "succeeded", job
    recovered = check_image(Path(data_pair(env)["target"]), writer.run_id, writer.capacity)
    assert recovered.clean, recovered.problem
    assert recovered.prefix >= writer.flushed, (
        f"{writer.flushed - recovered.prefix} flushed records lost ({recovered.prefix} of {writer.flushed})"
    )
    return recovered


def active_alerts(env: Environment, code: str) -> list[dict[str, Any]]:
    return [e for e in env.api.get("/api/events", alerts="true", active="true") if e["code"] == code]


def alerts_ever(env: Environment, code: str) -> list[dict[str, Any]]:
    return [e for e in env.api.get("/api/events", alerts="true") if e["code"] == code]
