"""A failover never hangs and never lies: the drain has a deadline with a stable code naming the
pair, and a recovered guest whose oracle failed fails the job, with the verdict."""

from __future__ import annotations

import pytest

from siterecovery.dataplane.assignments import PointInfo
from siterecovery.dr import items as repo
from siterecovery.dr.operations import FailoverRequest, change_point_tasks, failover_tasks
from siterecovery.dr.tasks import drain, verify_recovery
from siterecovery.errors import SiteRecoveryError
from siterecovery.store.jobs import TaskContext
from siterecovery.store.record import Site
from tests.dr.conftest import Plane


def test_drain_that_never_completes_fails_with_its_code(
    plane: Plane, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The agent had 10 writes acknowledged; the master target applied 5 and moves no further (a
    # refused frame, a cut link): the planned failover must not wait for ever.
    plane.report(captured=10, acked=10, applied=5, at=plane.t0)
    monkeypatch.setenv("SITERECOVERY_DRAIN_TIMEOUT", "1")
    job, ordinal = plane.job_task("drain")
    with pytest.raises(SiteRecoveryError) as err:
        drain(TaskContext(job, ordinal, {"item": "it", "planned": True}))
    problem = err.value.first
    assert problem.code == "drain-timeout"
    assert "p1" in problem.message and "web1" in problem.message and "applied 5, needs 10" in problem.message
    assert "unplanned failover" in problem.remediation
    assert problem.detail["pairs"] == ["p1"]

    plane.report(captured=10, acked=10, applied=10, at=plane.t0 + 1)  # drained: the task passes
    assert drain(TaskContext(job, ordinal, {"item": "it", "planned": True})) == {"drained_to": {"p1": 10}}


def test_failover_whose_guest_check_failed_does_not_succeed(plane: Plane) -> None:
    item = repo.load("it")
    tasks = failover_tasks(item, FailoverRequest(point="latest", planned=True))
    # The last task judges the verdict, after the item is marked failed over (which it truly is).
    assert [t.action for t in tasks[-2:]] == ["mark-failed-over", "verify-recovery"]
    verify = tasks[-1]
    assert verify.args["target_site"] == Site.CLOUD.value

    bad = {"ok": False, "observable": True, "reason": "FAILED at record 3187", "records": 3186}
    plane.set_record(oracle={"cloud": bad})
    with pytest.raises(SiteRecoveryError) as err:
        verify_recovery(TaskContext("j", 0, verify.args))
    assert err.value.first.code == "recovery-verdict-failed"
    assert "FAILED at record 3187" in err.value.first.message
    assert "change-point" in err.value.first.remediation

    plane.set_record(oracle={"cloud": {"ok": True, "observable": True, "records": 4000}})
    assert verify_recovery(TaskContext("j", 0, verify.args)) == {"verdict": "pass (4000 records)"}


def test_a_point_change_is_verified_too(plane: Plane) -> None:
    from siterecovery.dr.held_failover import held_failover

    latest = PointInfo(id="latest", kind="latest", time=plane.t0, seq=5)
    plane.report(captured=5, acked=5, applied=5, at=plane.t0, points=[latest])
    item = repo.load("it")
    assert item.record.replication is not None
    plane.set_record(held=held_failover(item.record.replication))
    with plane.cp.db.session() as s:
        from siterecovery.store.models import ReplicatedItem

        row = s.get(ReplicatedItem, "it")
        assert row is not None
        row.state = "failed-over"
    tasks = change_point_tasks(repo.load("it"), "latest")
    assert tasks[-1].action == "verify-recovery"
