"""Transient provider errors are retried as DBOS step retries; permanent ones fail the task at once.

The job engine runs for real (DBOS on SQLite, in this process); the provider is a fake whose
`discover()` raises the errors it is given first. Also: which errors count as transient.
"""

from __future__ import annotations

import errno
import io
import json
import logging
import pickle
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
from dbos import DBOS

from siterecovery.config import load_server_config
from siterecovery.errors import Problem, SiteRecoveryError, Status
from siterecovery.fabrics.base import FabricError
from siterecovery.logs import JsonFormatter
from siterecovery.retry import VIR_ERR_OPERATION_TIMEOUT, VIR_ERR_RPC, is_transient
from siterecovery.server.main import start_engine
from siterecovery.store import jobs
from siterecovery.store.context import ControlPlane, open_control_plane
from siterecovery.store.models import Job, JobTask

VIR_ERR_INVALID_ARG = 8  # virterror.h: a caller's mistake, not worth retrying


class FabricFake:
    """A provider whose `discover()` raises each of `failures` once, in order, then answers."""

    def __init__(self, failures: list[BaseException]) -> None:
        self.failures = failures
        self.calls = 0

    def discover(self) -> str:
        self.calls += 1
        if self.failures:
            raise self.failures.pop(0)
        return "inventory"


FAKES: dict[str, FabricFake] = {}
E = TypeVar("E", bound=BaseException)


@jobs.task_handler("discover-fake")
def _discover(ctx: jobs.TaskContext) -> dict[str, Any]:
    logging.getLogger("siterecovery.test").info("discovering %s", ctx.args["fabric"])
    return {"inventory": FAKES[ctx.args["fabric"]].discover()}


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[ControlPlane]:
    cp = open_control_plane(load_server_config(tmp_path))
    start_engine(cp)
    try:
        yield cp
    finally:
        DBOS.destroy(destroy_registry=False)
        cp.db.engine.dispose()


def _start(fabric: str, failures: list[BaseException]) -> str:
    FAKES[fabric] = FabricFake(failures)
    return jobs.create_job(
        "discover",
        [jobs.TaskSpec("discover", "discover-fake", {"fabric": fabric})],
        target_type="replicatedItem",
        target_id="item-7",
    )


def _run(cp: ControlPlane, fabric: str, failures: list[BaseException]) -> tuple[Job, JobTask, FabricFake]:
    return _wait(cp, _start(fabric, failures), fabric)


def _wait(cp: ControlPlane, job_id: str, fabric: str) -> tuple[Job, JobTask, FabricFake]:
    fake = FAKES[fabric]
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        with cp.db.session() as s:
            job = s.get(Job, job_id)
            assert job is not None
            if job.state in ("succeeded", "failed"):
                task = s.query(JobTask).filter_by(job_id=job_id).one()
                s.expunge_all()
                return job, task, fake
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} did not finish")


def test_transient_errors_are_retried_then_the_job_succeeds(engine: ControlPlane) -> None:
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(JsonFormatter())
    logging.getLogger().addHandler(handler)
    level = logging.getLogger().level
    logging.getLogger().setLevel(logging.INFO)
    try:
        job, task, fake = _run(
            engine, "flaky", [ConnectionResetError(errno.ECONNRESET, "reset by peer"), TimeoutError("read")]
        )
    finally:
        logging.getLogger().removeHandler(handler)
        logging.getLogger().setLevel(level)
    assert job.state == "succeeded", job.error
    assert fake.calls == 3 and task.attempts == 3
    assert job.result == {"0": {"inventory": "inventory"}}
    # The task's log lines, ours and the handler's, name the job and the item (JSON logs).
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    mine = [r for r in lines if r.get("job_id") == job.id]
    assert {r["logger"] for r in mine} >= {"siterecovery.jobs", "siterecovery.test"}
    assert all(r["item_id"] == "item-7" for r in mine)


def test_a_permanent_error_fails_at_once_with_its_code(engine: ControlPlane) -> None:
    denied = FabricError(
        "vcenter-permission-missing", "The account lacks VirtualMachine.Config.", "Grant it."
    )
    job, task, fake = _run(engine, "denied", [denied])
    assert job.state == "failed"
    assert job.error["code"] == "vcenter-permission-missing"
    assert job.error["remediation"] == "Grant it."
    assert fake.calls == 1 and task.attempts == 1


def test_a_finished_task_answers_its_committed_outcome_instead_of_running_again(engine: ControlPlane) -> None:
    """RPW-4: a kill -9 can land after a task committed `succeeded` but before DBOS recorded the
    step's output; on recovery DBOS runs the step again. The step must answer the outcome the task
    committed with its state, not run the handler a second time."""
    job, task, fake = _run(engine, "once", [])
    assert job.state == "succeeded" and fake.calls == 1 and task.attempts == 1
    # What DBOS recovery does when the step's output was not recorded: call the step again.
    again = jobs._execute_task(job.id, 0)
    assert again == {"result": {"inventory": "inventory"}}
    with engine.db.session() as s:
        task = s.query(JobTask).filter_by(job_id=job.id).one()
        assert task.attempts == 1 and task.state == "succeeded"
    assert fake.calls == 1  # the handler did not run twice


def _raised_from(exc: E, cause: BaseException) -> E:
    exc.__cause__ = cause
    return exc


def _unreachable() -> FabricError:
    """What the vSphere provider raises for a refused connection: a coded error from the OSError."""
    return _raised_from(
        FabricError("vcenter-unreachable", "vc1:443 does not answer.", "Check that vCenter runs."),
        ConnectionRefusedError(errno.ECONNREFUSED, "refused"),
    )


def test_transient_errors_that_persist_fail_once_the_attempts_run_out(engine: ControlPlane) -> None:
    # Both jobs run at once, so their retry intervals overlap.
    plain = _start("down", [ConnectionRefusedError("refused") for _ in range(9)])
    coded = _start("vc-down", [_unreachable() for _ in range(9)])
    job, task, fake = _wait(engine, plain, "down")
    assert job.state == "failed"
    assert job.error["code"] == "task-retries-exhausted"
    assert "ConnectionRefusedError" in job.error["message"]
    assert fake.calls == jobs.STEP_MAX_ATTEMPTS == task.attempts
    # A provider's coded error raised from a transient one was retried too, and keeps its code.
    job, task, fake = _wait(engine, coded, "vc-down")
    assert job.state == "failed"
    assert job.error["code"] == "vcenter-unreachable"
    assert job.error["remediation"] == "Check that vCenter runs."
    assert f"failed {jobs.STEP_MAX_ATTEMPTS} times" in job.error["message"]
    assert fake.calls == jobs.STEP_MAX_ATTEMPTS == task.attempts


def test_a_transient_failure_survives_pickling() -> None:
    # DBOS records what the step raised by pickling it; a crash-recovered job reads it back.
    failure = jobs.TransientFailure.of(_unreachable())
    back = pickle.loads(pickle.dumps(failure))
    assert (back.summary, back.problem_code, back.remediation) == (
        "vc1:443 does not answer.",
        "vcenter-unreachable",
        "Check that vCenter runs.",
    )


class LibvirtErrorFake(Exception):
    """Shaped like libvirt.libvirtError (libvirt-python is an optional extra)."""

    def __init__(self, code: int) -> None:
        super().__init__(f"libvirt error {code}")
        self.code_number = code

    def get_error_code(self) -> int:
        return self.code_number


def _http_status(code: int) -> httpx.HTTPStatusError:
    request = httpx.Request("GET", "https://vcenter.example/sdk")
    return httpx.HTTPStatusError("status", request=request, response=httpx.Response(code, request=request))


@pytest.mark.parametrize(
    ("exc", "transient"),
    [
        (ConnectionResetError(errno.ECONNRESET, "reset"), True),
        (ConnectionRefusedError(errno.ECONNREFUSED, "refused"), True),
        (TimeoutError("timed out"), True),
        (OSError(errno.EHOSTUNREACH, "no route"), True),
        (httpx.ConnectError("connect"), True),
        (httpx.ReadTimeout("read"), True),
        (_http_status(503), True),
        (_http_status(429), True),
        (_http_status(404), False),
        (_http_status(403), False),
        (LibvirtErrorFake(VIR_ERR_RPC), True),
        (LibvirtErrorFake(VIR_ERR_OPERATION_TIMEOUT), True),
        (LibvirtErrorFake(VIR_ERR_INVALID_ARG), False),
        (FabricError("vcenter-task-timeout", "timed out"), False),
        (_unreachable(), True),
        (_raised_from(FabricError("libvirt-operation-failed", "x"), LibvirtErrorFake(VIR_ERR_RPC)), True),
        (_raised_from(FabricError("disk-not-found", "x"), ValueError("no such file")), False),
        (SiteRecoveryError(Problem("x", "y", "z"), Status.UNAVAILABLE), False),
        (OSError(errno.ENOSPC, "full"), False),
        (ValueError("bad"), False),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, BaseException) else str(v),
)
def test_which_errors_are_transient(exc: BaseException, transient: bool) -> None:
    assert is_transient(exc) is transient
