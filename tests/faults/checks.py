"""What every scenario ends with: a planned failover, then the writer's records on the recovered
disk — every record flushed before the shutdown, as a clean prefix."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from siterecovery.demo.environment import Environment
from tests.e2e.conftest import run_job
from tests.faults.conftest import DATA, MACHINE
from tests.faults.points import PointVerdict, check_crash_points
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


def check_listed_points(
    env: Environment, listed: list[dict[str, Any]], writer: RecordWriter, scratch: Path
) -> list[PointVerdict]:
    """After the failover: stop mt-cloud and materialise every listed crash point of the data disk."""
    pair = data_pair(env)
    env.stop_component("mt-cloud")  # the journal has one owner
    return check_crash_points(
        listed,
        env.root / "retention" / "cloud",
        pair["pair_id"],
        Path(pair["target"]),
        writer.run_id,
        writer.capacity,
        scratch,
    )


def points_summary(points: list[PointVerdict]) -> str:
    clean = sum(p.verdict is not None and p.verdict.clean for p in points)
    unusable = sum(bool(p.listed_unusable or p.refused) for p in points)
    return f"{clean}/{len(points)}" + (f" ({unusable} listed unusable or refused)" if unusable else "")


def assert_points_sound(points: list[PointVerdict]) -> None:
    """A point listed as usable is a clean prefix; one listed unusable may be anything but is
    never offered; one the journal refuses is never served."""
    bad = [p for p in points if p.served_damaged and not p.listed_unusable]
    assert not bad, f"listed crash points that are not a clean prefix: {bad}"
    refused_but_listed = [p for p in points if p.refused and not p.listed_unusable]
    assert not refused_but_listed, f"points listed as usable that cannot be restored: {refused_but_listed}"
