"""A real configuration-server database holding one protected item (web1, pair p1) with its agent
and master target, whose reported statistics a test sets: the DR logic runs against it directly."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from siterecovery.config import load_server_config
from siterecovery.dataplane.assignments import (
    AgentStats,
    CacheHealth,
    MasterTargetPairStats,
    MasterTargetStats,
    PairState,
    PairStats,
    PointInfo,
    ProcessServerStats,
    RefusedFrame,
)
from siterecovery.dr import monitor
from siterecovery.store.context import ControlPlane, open_control_plane
from siterecovery.store.models import Component, Job, JobTask, Policy, ReplicatedItem
from siterecovery.store.points import store_report
from siterecovery.store.record import ItemDisk, ItemRecord, Pair, Replication, Site


@pytest.fixture(autouse=True)
def fresh_capture_history(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test starts with no capture history. The monitor keeps one per process, by pair id
    (`monitor._HISTORY`), and every test here names its pair p1: a test that reported at
    t0 + 200 left an entry that later tests' earlier reports could not follow (a report is kept
    only when newer), so their lagging RPO was read from another test's times — harmless for
    today's assertions, but decided by test order and the seconds between tests."""
    monkeypatch.setattr(monitor._HISTORY, "_pairs", {})


class Plane:
    def __init__(self, cp: ControlPlane) -> None:
        self.cp = cp
        self.t0 = time.time()

    def report(
        self, *, captured: int, acked: int, applied: int, at: float, points: list[PointInfo] | None = None
    ) -> None:
        """The agent and master target heartbeat these sequences of pair p1 at time `at`."""
        with self.cp.db.session() as s:
            agent, mt = s.get(Component, "ag"), s.get(Component, "mt")
            assert agent is not None and mt is not None
            agent.stats = AgentStats(
                pairs=[
                    PairStats(pair_id="p1", state=PairState.PROTECTED, captured_seq=captured, acked_seq=acked)
                ]
            ).model_dump(mode="json")
            report = MasterTargetStats(
                pairs=[
                    MasterTargetPairStats(
                        pair_id="p1", applied_seq=applied, last_applied_time=at, points=points or []
                    )
                ]
            ).model_dump(mode="json")
            mt.stats, _ = store_report(s, mt, report)  # as the heartbeat does: points to their rows
            agent.last_heartbeat = mt.last_heartbeat = at

    def report_refused(self, *refused: RefusedFrame) -> None:
        """The process server heartbeats these refused frames."""
        with self.cp.db.session() as s:
            ps = s.get(Component, "ps")
            assert ps is not None
            ps.stats = ProcessServerStats(
                cache_used_bytes=0,
                cache_capacity_bytes=1 << 30,
                cache_free_percent=90.0,
                cache_health=CacheHealth.OK,
                backlog_bytes=0,
                throughput_bytes_per_s=0.0,
                drain_seconds=None,
                pairs=1,
                refused_frames=list(refused),
            ).model_dump(mode="json")

    def item(self) -> ReplicatedItem:
        with self.cp.db.session() as s:
            row = s.get(ReplicatedItem, "it")
            assert row is not None
            s.expunge(row)
            return row

    def set_record(self, **fields: Any) -> None:
        with self.cp.db.session() as s:
            row = s.get(ReplicatedItem, "it")
            assert row is not None
            row.details = (
                ItemRecord.model_validate(row.details).model_copy(update=fields).model_dump(mode="json")
            )

    def job_task(self, action: str) -> tuple[str, int]:
        """A job row with one running task, for a task handler's progress reports."""
        with self.cp.db.session() as s:
            s.add(Job(id=f"job-{action}", kind=action, state="running"))
            s.flush()
            s.add(JobTask(job_id=f"job-{action}", ordinal=0, name=action, action=action, state="running"))
        return f"job-{action}", 0


def gold_policy(rpo_threshold_seconds: int) -> Policy:
    """The item's replication policy ("pol")."""
    return Policy(
        id="pol",
        name="gold",
        kind="replication",
        rpo_threshold_seconds=rpo_threshold_seconds,
        retention_seconds=3600,
        app_consistent_frequency_seconds=0,
    )


def protected_item() -> ReplicatedItem:
    """The protected item "it": web1 with one pair p1, agent "ag", process server "ps" and
    master target "mt", under policy "pol"."""
    rec = ItemRecord(
        onprem_fabric="f1",
        cloud_fabric="f2",
        machine="web1",
        os_type="linux",
        disks=[ItemDisk(label="disk0", size=1 << 20, onprem_path="/a", onprem_uuid="u", cloud_path="/b")],
        replication=Replication(
            source_site=Site.ONPREM,
            source_machine="web1",
            process_server="ps",
            master_target="mt",
            pairs=[Pair(pair_id="p1", disk="disk0", source="/a", target="/b", size=1 << 20)],
        ),
    )
    return ReplicatedItem(
        id="it",
        name="web1",
        machine="web1",
        source_fabric_id="f1",
        target_fabric_id="f2",
        direction="onprem-to-cloud",
        state="protected",
        policy_id="pol",
        details=rec.model_dump(mode="json"),
    )


@pytest.fixture
def plane(tmp_path: Path) -> Iterator[Plane]:
    cp = open_control_plane(load_server_config(tmp_path))
    with cp.db.session() as s:
        s.add(gold_policy(3600))
        s.add(Component(id="ag", kind="agent", name="onprem/web1"))
        s.add(Component(id="mt", kind="master-target", name="mt-cloud"))
        s.add(Component(id="ps", kind="process-server", name="ps-onprem"))
        s.flush()
        s.add(protected_item())
    plane = Plane(cp)
    plane.report(captured=0, acked=0, applied=0, at=plane.t0)
    yield plane
    cp.db.engine.dispose()
