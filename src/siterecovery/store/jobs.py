"""Durable jobs: a job is a DBOS workflow and each of its visible tasks is a DBOS step.

The `jobs` / `job_tasks` tables hold what operators see (state, percent, bytes, errors). DBOS
holds what makes a job survive a crash: when the server starts again, DBOS re-runs every
unfinished workflow, and each finished step returns its recorded result instead of running
again — so a reprotect resumes where it was, it does not redo finished tasks. DBOS records a
step's output only after it returns, so the task's row also commits its outcome with its end
state, and a step run again after a crash in that window answers it (`_execute_task`). A task
handler interrupted before it finished runs again, so it must be safe to (idempotent).

A task that fails on a transient provider error (`retry.is_transient`: a reset connection, a
timeout, HTTP 5xx/429, libvirt's RPC errors) raises out of its step and DBOS runs the step again
(`STEP_MAX_ATTEMPTS`, waits growing from `STEP_RETRY_INTERVAL` by `STEP_BACKOFF_RATE`); when the
attempts run out the task fails with the last error's code, or `task-retries-exhausted` if it had
none. Every other failure ends the task at once with its code (a provider error's own `code`, else
`task-failed`).

Manual actions (recovery plans) pause the workflow on `DBOS.recv` until `jobs resume` sends it a
message; the job shows `paused` meanwhile, and that wait survives restarts too.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, ExitStack
from dataclasses import dataclass, field
from typing import Any

from dbos import DBOS, SetWorkflowID
from dbos._error import DBOSMaxStepRetriesExceeded
from sqlalchemy import select

from siterecovery.errors import Problem, SiteRecoveryError, conflict, not_found
from siterecovery.logs import log_context
from siterecovery.retry import is_transient
from siterecovery.store.context import current
from siterecovery.store.events import record_event
from siterecovery.store.models import Job, JobTask, new_id, now
from siterecovery.store.states import JobState, Severity, TaskState

log = logging.getLogger("siterecovery.jobs")

RESUME_TOPIC = "resume"
# Jobs of a cluster on PostgreSQL: every server process takes work from this queue.
JOB_QUEUE = "siterecovery-jobs"


def register_job_queue() -> None:
    """Declare the job queue in DBOS's database (after launch); every process then polls it."""
    DBOS.register_queue(JOB_QUEUE, polling_interval_sec=0.5)


MANUAL_ACTION = "manual-action"
# A transient provider error is retried 4 times, after 1, 2, 4 and 8 s (then the task fails).
STEP_MAX_ATTEMPTS = 5
STEP_RETRY_INTERVAL = 1.0
STEP_BACKOFF_RATE = 2.0


@dataclass(frozen=True)
class TaskSpec:
    """One visible task of a job: a name and the registered handler that performs it."""

    name: str
    action: str
    args: dict[str, Any] = field(default_factory=dict)


class TaskContext:
    """Handed to a task handler: its arguments and a way to report progress."""

    def __init__(self, job_id: str, ordinal: int, args: dict[str, Any]) -> None:
        self.job_id = job_id
        self.ordinal = ordinal
        self.args = args

    def progress(
        self,
        percent: float | None = None,
        bytes_done: int | None = None,
        bytes_total: int | None = None,
        message: str | None = None,
    ) -> None:
        with current().db.session() as s:
            task = _task(s, self.job_id, self.ordinal)
            if bytes_total is not None:
                task.bytes_total = bytes_total
            if bytes_done is not None:
                task.bytes_done = bytes_done
                if percent is None and task.bytes_total:
                    percent = 100.0 * bytes_done / task.bytes_total
            if percent is not None:
                task.percent = max(0.0, min(100.0, percent))
            if message is not None:
                task.message = message


TaskHandler = Callable[[TaskContext], dict[str, Any] | None]
_HANDLERS: dict[str, TaskHandler] = {}


def task_handler(action: str) -> Callable[[TaskHandler], TaskHandler]:
    """Register a function as the handler of tasks with this action name."""

    def register(fn: TaskHandler) -> TaskHandler:
        _HANDLERS[action] = fn
        return fn

    return register


# Context managers every task runs inside, outermost first: what a task opens for itself (e.g.
# provider sessions, see `dr.items.fabric_sessions`) is released when it ends, however it ends.
_TASK_SCOPES: list[Callable[[], AbstractContextManager[object]]] = []


def around_tasks(scope: Callable[[], AbstractContextManager[object]]) -> None:
    _TASK_SCOPES.append(scope)


def _task(s: Any, job_id: str, ordinal: int) -> JobTask:
    task = s.scalar(select(JobTask).where(JobTask.job_id == job_id, JobTask.ordinal == ordinal))
    if task is None:
        raise RuntimeError(f"job {job_id} has no task {ordinal}")
    return task  # type: ignore[no-any-return]


def create_job(
    kind: str,
    tasks: Sequence[TaskSpec],
    *,
    target_type: str = "",
    target_id: str = "",
    target_name: str = "",
    params: dict[str, Any] | None = None,
) -> str:
    """Record a job and its tasks, then start its workflow. Returns the job id."""
    for spec in tasks:
        if spec.action != MANUAL_ACTION and spec.action not in _HANDLERS:
            raise RuntimeError(f"no task handler registered for {spec.action!r}")
    job_id = new_id("job")
    with current().db.session() as s:
        s.add(
            Job(
                id=job_id,
                kind=kind,
                target_type=target_type,
                target_id=target_id,
                target_name=target_name,
                state=JobState.QUEUED,
                params=params or {},
            )
        )
        s.flush()
        for i, spec in enumerate(tasks):
            s.add(
                JobTask(
                    job_id=job_id,
                    ordinal=i,
                    name=spec.name,
                    action=spec.action,
                    args=spec.args,
                    state=TaskState.PENDING,
                )
            )
    with SetWorkflowID(job_id):
        if current().db.engine.dialect.name == "postgresql":
            queue = DBOS.retrieve_queue(JOB_QUEUE)
            if queue is None:
                raise RuntimeError("the job queue is not registered (see register_job_queue)")
            queue.enqueue(run_job, job_id)  # any server process of the cluster may run it
        else:
            DBOS.start_workflow(run_job, job_id)  # SQLite: one process, start it right here
    return job_id


@DBOS.step()
def _start_job(job_id: str) -> int:
    with current().db.session() as s:
        job = s.get(Job, job_id)
        if job is None:
            raise RuntimeError(f"job {job_id} vanished")
        if job.started_at is None:
            job.started_at = now()
        job.state = JobState.RUNNING
        return len(list(s.scalars(select(JobTask.id).where(JobTask.job_id == job_id))))


@DBOS.step(
    retries_allowed=True,
    max_attempts=STEP_MAX_ATTEMPTS,
    interval_seconds=STEP_RETRY_INTERVAL,
    backoff_rate=STEP_BACKOFF_RATE,
)
def _execute_task(job_id: str, ordinal: int) -> dict[str, Any]:
    """Run one task, or answer the outcome it already committed: a finished task never runs twice.

    DBOS records a step's output only after the step returns; the task's own row commits its end
    state and outcome first, so a crash between the two (a kill -9 just after the task shows
    `succeeded`) would otherwise run the finished task again on recovery.
    """
    with current().db.session() as s:
        task = _task(s, job_id, ordinal)
        if task.state in (TaskState.SUCCEEDED, TaskState.FAILED) and task.result is not None:
            return task.result
        task.state = TaskState.RUNNING
        task.attempts += 1
        task.started_at = task.started_at or now()
        action, args = task.action, dict(task.args)
        job = s.get(Job, job_id)
        item_id = job.target_id if job is not None and job.target_type == "replicatedItem" else None
    # Every log line of the task, its handler's and ours, names the job and the item.
    with log_context(job_id=job_id, item_id=item_id):
        return _run_task(TaskContext(job_id, ordinal, args), action)


def _run_task(ctx: TaskContext, action: str) -> dict[str, Any]:
    job_id, ordinal = ctx.job_id, ctx.ordinal
    try:
        with ExitStack() as scopes:
            for scope in _TASK_SCOPES:
                scopes.enter_context(scope())
            result = _HANDLERS[action](ctx) or {}
    except SiteRecoveryError as exc:
        # The first problem heads the error; all of them stay (a refused reprotect lists every rule).
        error = {**exc.first.as_dict(), "problems": [p.as_dict() for p in exc.problems]}
        return _finish_task(job_id, ordinal, TaskState.FAILED, {"failed": [error]}, error=error)
    except Exception as exc:  # a task's own failure ends the job, never the server
        if is_transient(exc):
            # Out of the step: DBOS runs it again after its interval (the handlers are idempotent).
            log.warning("task %s of job %s hit a transient error, to be retried: %r", ordinal, job_id, exc)
            with current().db.session() as s:
                _task(s, job_id, ordinal).message = f"retrying after a transient error: {exc!r}"[:500]
            raise TransientFailure.of(exc) from exc
        log.exception("task %s of job %s failed", ordinal, job_id)
        problem = _permanent_problem(exc)
        return _finish_task(
            job_id, ordinal, TaskState.FAILED, {"failed": [problem.as_dict()]}, error=problem.as_dict()
        )
    return _finish_task(job_id, ordinal, TaskState.SUCCEEDED, {"result": result})


def _permanent_problem(exc: Exception) -> Problem:
    """A provider error with an operator-facing code keeps it; anything else is `task-failed`."""
    code = getattr(exc, "code", None)
    if isinstance(code, str) and code:
        message = str(getattr(exc, "message", "") or exc)
        remediation = str(getattr(exc, "remediation", "") or "Fix the cause named above and rerun.")
        return Problem(code, message, remediation)
    return Problem("task-failed", f"Task failed: {exc}", "See the server log; fix the cause and rerun.")


class TransientFailure(Exception):
    """A task's transient error as DBOS records it between retries.

    DBOS pickles what a step raised; a provider's own exception may not unpickle (its constructor
    wants more than its message), so the step raises this plain summary instead, keeping the
    operator-facing code when the error had one.
    """

    def __init__(self, summary: str, code: str = "", remediation: str = "") -> None:
        super().__init__(summary, code, remediation)
        self.summary = summary
        self.problem_code = code
        self.remediation = remediation

    @classmethod
    def of(cls, exc: Exception) -> TransientFailure:
        code = getattr(exc, "code", None)
        if isinstance(code, str) and code:
            message = str(getattr(exc, "message", "") or exc)
            return cls(message, code, str(getattr(exc, "remediation", "") or ""))
        return cls(repr(exc))


@DBOS.step()
def _retries_exhausted(
    job_id: str, ordinal: int, summary: str, code: str, remediation: str
) -> dict[str, Any]:
    if code:
        # The provider's own code says what is down; the attempts say it did not come back.
        message = f"{summary} (failed {STEP_MAX_ATTEMPTS} times on transient errors)"
        problem = Problem(code, message, remediation or "Fix the cause named above and rerun.")
    else:
        problem = Problem(
            "task-retries-exhausted",
            f"The task failed {STEP_MAX_ATTEMPTS} times on transient errors; the last: {summary}",
            "Check that the provider (vCenter, libvirt host, Azure) and the network to it are up, "
            "then rerun the job.",
        )
    return _finish_task(
        job_id, ordinal, TaskState.FAILED, {"failed": [problem.as_dict()]}, error=problem.as_dict()
    )


def _finish_task(
    job_id: str,
    ordinal: int,
    state: TaskState,
    outcome: dict[str, Any],
    error: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Commit a task's end state and its outcome together; returns the outcome."""
    with current().db.session() as s:
        task = _task(s, job_id, ordinal)
        task.state = state
        task.result = outcome
        task.ended_at = now()
        if state is TaskState.SUCCEEDED:
            task.percent = 100.0
        if error:
            task.error = error
    return outcome


@DBOS.step()
def _enter_manual_action(job_id: str, ordinal: int) -> None:
    with current().db.session() as s:
        task = _task(s, job_id, ordinal)
        task.state = TaskState.WAITING
        task.started_at = task.started_at or now()
        task.attempts += 1
        job = s.get(Job, job_id)
        if job is not None:
            job.state = JobState.PAUSED
            record_event(
                s,
                Severity.INFO,
                "job-paused",
                f"Job {job_id} waits for a manual action: {task.name}.",
                "job",
                job_id,
            )


@DBOS.step()
def _leave_manual_action(job_id: str, ordinal: int) -> None:
    _finish_task(job_id, ordinal, TaskState.SUCCEEDED, {"result": {}})
    with current().db.session() as s:
        job = s.get(Job, job_id)
        if job is not None and job.state == JobState.PAUSED:
            job.state = JobState.RUNNING


@DBOS.step()
def _finish_job(job_id: str, state: JobState, error: dict[str, Any], result: dict[str, Any]) -> None:
    with current().db.session() as s:
        job = s.get(Job, job_id)
        if job is None:
            return
        job.state = state
        job.ended_at = now()
        job.error = error
        job.result = result
        for task in s.scalars(select(JobTask).where(JobTask.job_id == job_id)):
            if task.state in (TaskState.PENDING, TaskState.RUNNING, TaskState.WAITING):
                task.state = TaskState.SKIPPED if state == JobState.FAILED else task.state
        severity = Severity.INFO if state == JobState.SUCCEEDED else Severity.WARNING
        record_event(s, severity, f"job-{state}", f"Job {job.kind} {job_id} {state}.", "job", job_id)


@DBOS.workflow()
def run_job(job_id: str) -> str:
    count = _start_job(job_id)
    results: dict[str, Any] = {}
    for ordinal in range(count):
        action = _task_action(job_id, ordinal)
        if action == MANUAL_ACTION:
            _enter_manual_action(job_id, ordinal)
            while DBOS.recv(RESUME_TOPIC, timeout_seconds=3600) is None:
                pass
            _leave_manual_action(job_id, ordinal)
            continue
        try:
            outcome = _execute_task(job_id, ordinal)
        except DBOSMaxStepRetriesExceeded as exc:
            last = exc.errors[-1] if exc.errors else None
            if not isinstance(last, TransientFailure):
                last = TransientFailure(repr(last))
            outcome = _retries_exhausted(job_id, ordinal, last.summary, last.problem_code, last.remediation)
        if "failed" in outcome:
            _finish_job(job_id, JobState.FAILED, outcome["failed"][0], results)
            return JobState.FAILED
        results[str(ordinal)] = outcome.get("result", {})
    _finish_job(job_id, JobState.SUCCEEDED, {}, results)
    return JobState.SUCCEEDED


def _task_action(job_id: str, ordinal: int) -> str:
    # Read outside a step: the task list is fixed when the job is created, so replay sees the same.
    with current().db.session() as s:
        return _task(s, job_id, ordinal).action


def cancel_job(job_id: str) -> None:
    with current().db.session() as s:
        job = s.get(Job, job_id)
        if job is None:
            raise not_found("job", job_id)
        if job.state.finished:
            raise conflict(
                "job-finished",
                f"Job {job_id} has already {job.state}.",
                "Only queued, running or paused jobs can be cancelled.",
            )
    DBOS.cancel_workflow(job_id)
    with current().db.session() as s:
        job = s.get(Job, job_id)
        assert job is not None
        job.state = JobState.CANCELLED
        job.ended_at = now()
        for task in s.scalars(select(JobTask).where(JobTask.job_id == job_id)):
            if task.state in (TaskState.PENDING, TaskState.RUNNING, TaskState.WAITING):
                task.state = TaskState.CANCELLED
        record_event(
            s, Severity.WARNING, "job-cancelled", f"Job {job.kind} {job_id} cancelled.", "job", job_id
        )


def resume_job(job_id: str) -> None:
    with current().db.session() as s:
        job = s.get(Job, job_id)
        if job is None:
            raise not_found("job", job_id)
        if job.state != JobState.PAUSED:
            raise conflict(
                "job-not-paused",
                f"Job {job_id} is {job.state}, not paused.",
                "Resume only jobs that wait for a manual action.",
            )
    DBOS.send(job_id, "resume", topic=RESUME_TOPIC)
