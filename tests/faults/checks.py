"""What every scenario ends with: a planned failover, then the writer's records on the recovered
disk — every record flushed before the shutdown, as a clean prefix — and in every crash point the
configuration server listed."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from siterecovery.demo.environment import Environment
from tests.e2e.conftest import run_job
from tests.faults.conftest import DATA
from tests.faults.points import PointVerdict, check_crash_points, listed_points
from tests.faults.records import RecordWriter, Verdict, check_image

TIMEOUT = 120.0


def wait(check: Callable[[], object], what: str, timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.25)


def data_pair(env: Environment, machine: str, disk: str = DATA) -> dict[str, Any]:
    """The writer's disk's pair (or `disk`'s): replicating, or as the failed-over item keeps it
    until commit."""
    details = env.api.get(f"/api/replicatedItems/{machine}")["details"]
    rep = details["replication"] or details["held"]["replication"]
    pair: dict[str, Any] = next(p for p in rep["pairs"] if p["disk"] == disk)
    return pair


def mt_pair(env: Environment, pair_id: str) -> dict[str, Any]:
    """mt-cloud's statistics of one pair (applied_seq, points, ...)."""
    for server in env.api.get("/api/servers"):
        if server["name"] == "mt-cloud":
            for p in server["stats"].get("pairs", []):
                if p["pair_id"] == pair_id:
                    return dict(p)
    return {}


def agent_pair(env: Environment, machine: str, pair_id: str) -> dict[str, Any]:
    """The machine's agent's statistics of one pair (captured_seq, acked_seq, ...)."""
    for server in env.api.get("/api/servers"):
        if server["name"] == f"onprem/{machine}":
            for p in server["stats"].get("pairs", []):
                if p["pair_id"] == pair_id:
                    return dict(p)
    return {}


def wait_caught_up(env: Environment, machine: str) -> None:
    """Until mt-cloud applied everything the agent had captured when this was called."""
    pair_id = data_pair(env, machine)["pair_id"]
    wait(lambda: agent_pair(env, machine, pair_id).get("captured_seq") is not None, "the agent's statistics")
    captured = int(agent_pair(env, machine, pair_id)["captured_seq"])
    wait(
        lambda: int(mt_pair(env, pair_id).get("applied_seq", -1)) >= captured, f"mt-cloud to apply {captured}"
    )


def active_alerts(env: Environment, code: str) -> list[dict[str, Any]]:
    return [e for e in env.api.get("/api/events", alerts="true", active="true") if e["code"] == code]


def alerts_ever(env: Environment, code: str) -> list[dict[str, Any]]:
    return [e for e in env.api.get("/api/events", alerts="true") if e["code"] == code]


def wait_listed(env: Environment, machine: str) -> list[dict[str, Any]]:
    """The item's points once it lists at least two crash points."""
    # Right after a master target restarts the item lists no points until it reports its pairs
    # again: wait for the listing (its journals keep every point), as an operator would.
    listed: list[dict[str, Any]] = []

    def crash_listed() -> bool:
        listed[:] = listed_points(env, machine)
        return sum(p["kind"] == "crash" for p in listed) >= 2

    wait(crash_listed, "the item's crash points to be listed")
    return listed


def planned_failover(
    env: Environment, machine: str, disk: str = DATA
) -> tuple[dict[str, Any], list[dict[str, Any]], dict[str, Any]]:
    """List the item's points, then fail over (planned). Returns the job, the points listed
    before it and the failed-over pair of `disk` (its replica and journal)."""
    listed = wait_listed(env, machine)
    job = run_job(env, f"/api/replicatedItems/{machine}/failover", {"planned": True})
    held = env.api.get(f"/api/replicatedItems/{machine}")["details"].get("held")
    assert held is not None, f"the failover did not happen: {job}"
    pair: dict[str, Any] = next(p for p in held["replication"]["pairs"] if p["disk"] == disk)
    return job, listed, pair


def check_points_offline(
    env: Environment,
    listed: list[dict[str, Any]],
    pair: dict[str, Any],
    check: Callable[[Path], Verdict],
    scratch: Path,
) -> list[PointVerdict]:
    """Materialise the listed crash points of a pair and judge each with `check`. The replica must
    not change but through mt-cloud's journal: before a failover, or after one when nothing has
    written the recovered disk (a booted VM writes its own disk, so its points go first)."""
    env.stop_component("mt-cloud")  # a journal has one owner: the points are checked offline
    try:
        return check_crash_points(
            listed, env.root / "retention" / "cloud", pair["pair_id"], Path(pair["target"]), check, scratch
        )
    finally:
        env.restart_component("mt-cloud", kill=False)


def fail_over_and_check(
    env: Environment, machine: str, writer: RecordWriter, scratch: Path
) -> tuple[dict[str, Any], Verdict, list[PointVerdict]]:
    """Stop the writer (it flushes), list the points, fail over (planned), then check the
    recovered data disk and every listed crash point. Returns the job and both verdicts; asserts
    nothing itself, so the caller records its figures first."""
    writer.stop()
    job, listed, pair = planned_failover(env, machine)
    recovered = check_image(Path(pair["target"]), writer.run_id, writer.capacity)
    points = check_points_offline(
        env, listed, pair, lambda image: check_image(image, writer.run_id, writer.capacity), scratch
    )
    return job, recovered, points


def points_summary(points: list[PointVerdict]) -> str:
    clean = sum(p.verdict is not None and p.verdict.clean for p in points)
    unusable = sum(bool(p.listed_unusable or p.refused) for p in points)
    return f"{clean}/{len(points)}" + (f" ({unusable} listed unusable)" if unusable else "")


def records_checked(recovered: Verdict, points: list[PointVerdict]) -> int:
    return recovered.prefix + sum(p.verdict.prefix for p in points if p.verdict)


def assert_sound(
    job: dict[str, Any], writer: RecordWriter, recovered: Verdict, points: list[PointVerdict]
) -> None:
    """Nothing flushed lost; every point listed as usable a clean prefix, and one the journal
    refuses is listed unusable (never offered, never served)."""
    assert recovered.clean, f"recovered disk: {recovered.problem}"
    assert recovered.prefix >= writer.flushed, (
        f"{writer.flushed - recovered.prefix} flushed records lost ({recovered.prefix} of {writer.flushed})"
    )
    bad = [p for p in points if p.served_damaged and not p.listed_unusable]
    assert not bad, f"listed crash points that are not a clean prefix: {bad}"
    hidden = [p for p in points if p.refused and not p.listed_unusable]
    assert not hidden, f"points listed as usable that cannot be restored: {hidden}"
    assert len(points) >= 2, points  # the run lasted several crash-point intervals
    assert job["state"] == "succeeded", job
