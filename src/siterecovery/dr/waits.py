"""Waiting for the data plane to report a condition, with progress, inside a job task.

Tasks never talk to components directly: they change items (and so desired state), then wait
here for the components' heartbeats to report that the change has taken effect.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from siterecovery.dataplane.assignments import AgentStats, MasterTargetStats, PairState, PairStats
from siterecovery.errors import Problem, SiteRecoveryError, drain_timeout
from siterecovery.store.context import current
from siterecovery.store.jobs import TaskContext
from siterecovery.store.models import Component
from siterecovery.store.points import with_points

POLL_SECONDS = 0.3


def component_stats(component_id: str) -> tuple[dict[str, Any], float | None]:
    with current().db.session() as s:
        row = s.get(Component, component_id)
        if row is None:
            return {}, None
        return dict(row.stats), row.last_heartbeat


def agent_pairs(component_id: str) -> dict[str, PairStats]:
    stats, _ = component_stats(component_id)
    if not stats:
        return {}
    return {p.pair_id: p for p in AgentStats.model_validate(stats).pairs}


def agent_pairs_acked(component_id: str, heartbeat_timeout: float, timeout: float) -> dict[str, PairStats]:
    """The agent's pairs once its process server acknowledged everything it captured, or as they
    stand once the agent stops heartbeating (or `timeout` passes). An agent that outlives its
    machine's shutdown (a libvirt host's agent, not the machine's own) is still sending its last
    writes; one that exited with the machine reports nothing new."""
    deadline = time.monotonic() + timeout
    while True:
        stats, heartbeat = component_stats(component_id)
        pairs = {p.pair_id: p for p in AgentStats.model_validate(stats).pairs} if stats else {}
        behind = any(p.captured_seq > p.acked_seq for p in pairs.values())
        alive = heartbeat is not None and time.time() - heartbeat <= heartbeat_timeout
        if not behind or not alive or time.monotonic() > deadline:
            return pairs
        time.sleep(POLL_SECONDS)


def mt_pairs(component_id: str) -> MasterTargetStats:
    """The master target's last report (pairs with points, copies done)."""
    with current().db.session() as s:
        row = s.get(Component, component_id)
        stats = with_points(s, row) if row is not None else {}
    return MasterTargetStats.model_validate(stats) if stats else MasterTargetStats()


def wait_until(
    condition: Callable[[], bool], timeout: float, code: str, message: str, remediation: str
) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise SiteRecoveryError(Problem(code, message, remediation))
        time.sleep(POLL_SECONDS)


def wait_for_sync(ctx: TaskContext, agent_id: str, pair_ids: list[str], timeout: float) -> list[PairStats]:
    """Wait until every pair finished its initial (full or delta) sync; report bytes as progress."""
    done: list[PairStats] = []

    def synced() -> bool:
        nonlocal done
        pairs = agent_pairs(agent_id)
        mine = [pairs[p] for p in pair_ids if p in pairs]
        total = sum(p.bytes_total for p in mine)
        ctx.progress(
            bytes_done=sum(p.bytes_done for p in mine),
            bytes_total=total or None,
            message=f"{sum(p.bytes_sent for p in mine)} bytes sent",
        )
        done = mine
        return len(mine) == len(pair_ids) and all(p.state is PairState.PROTECTED for p in mine)

    wait_until(
        synced,
        timeout,
        "sync-timeout",
        f"Replication of {len(pair_ids)} disk(s) did not finish "
        f"its initial synchronisation within {timeout:.0f} s.",
        "Check the agent, process server and master target health (`servers list`), then retry.",
    )
    return done


def wait_for_apply(
    ctx: TaskContext, mt_id: str, targets: dict[str, int], timeout: float, machine: str
) -> None:
    """Wait until the master target applied every pair up to its sequence number (drain).

    The wait has a deadline: a pair that never drains (a stalled link, a refused frame) fails the
    task with `drain-timeout` naming it, instead of holding the failover for ever.
    """
    behind: dict[str, tuple[int, int]] = {}

    def applied() -> bool:
        reported = mt_pairs(mt_id).pairs
        got = {p.pair_id: p.applied_seq for p in reported}
        # A refused write still being re-read from the source is not drained either (healing.py).
        gaps = {p.pair_id for p in reported if p.missing}
        behind.clear()
        behind.update(
            {p: (got.get(p, -1), seq) for p, seq in targets.items() if got.get(p, -1) < seq or p in gaps}
        )
        ctx.progress(
            percent=100.0 * (len(targets) - len(behind)) / max(1, len(targets)),
            message=f"{len(behind)} disk(s) still draining: {', '.join(sorted(behind))}"
            if behind
            else "drained",
        )
        return not behind

    deadline = time.monotonic() + timeout
    while not applied():
        if time.monotonic() > deadline:
            raise drain_timeout(machine, behind, timeout)
        time.sleep(POLL_SECONDS)
