"""Jobs: list, show (with tasks and progress), cancel, resume."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Query, Request, Response
from sqlalchemy import select
from sqlalchemy.orm import Session

from siterecovery.control.api.deps import operator, reader, session
from siterecovery.control.api.paging import page
from siterecovery.control.schemas import JobOut, TaskOut
from siterecovery.errors import not_found
from siterecovery.store import jobs as engine
from siterecovery.store.models import Job, JobTask
from siterecovery.store.states import JobState
from siterecovery.store.tokens import Principal

router = APIRouter(prefix="/api/jobs", tags=["jobs"])


def job_view(s: Session, job: Job) -> JobOut:
    tasks = list(s.scalars(select(JobTask).where(JobTask.job_id == job.id).order_by(JobTask.ordinal)))
    percent = sum(t.percent for t in tasks) / len(tasks) if tasks else 0.0
    return JobOut(
        id=job.id,
        kind=job.kind,
        target_type=job.target_type,
        target_id=job.target_id,
        target_name=job.target_name,
        state=job.state,
        percent=round(percent, 1),
        params=job.params,
        result=job.result,
        error=job.error,
        created_at=job.created_at,
        started_at=job.started_at,
        ended_at=job.ended_at,
        tasks=[
            TaskOut(
                ordinal=t.ordinal,
                name=t.name,
                action=t.action,
                state=t.state,
                percent=t.percent,
                bytes_done=t.bytes_done,
                bytes_total=t.bytes_total,
                message=t.message,
                attempts=t.attempts,
                error=t.error,
                started_at=t.started_at,
                ended_at=t.ended_at,
            )
            for t in tasks
        ],
    )


def find_jobs(
    s: Session,
    state: JobState | None = None,
    kind: str | None = None,
    target: str | None = None,
    limit: int = 100,
    after: str | None = None,
) -> list[Job]:
    """Up to `limit` jobs, newest first, older than job `after` (keyset: created_at, then id)."""
    q = select(Job).order_by(Job.created_at.desc(), Job.id.desc()).limit(limit)
    last = s.get(Job, after) if after else None
    if after and last is None:
        raise not_found("job", after)
    if last is not None:
        q = q.where(
            (Job.created_at < last.created_at) | ((Job.created_at == last.created_at) & (Job.id < last.id))
        )
    if state is not None:
        q = q.where(Job.state == state)
    if kind:
        q = q.where(Job.kind == kind)
    if target:
        q = q.where((Job.target_id == target) | (Job.target_name == target))
    return list(s.scalars(q))


@router.get("")
def list_jobs(
    request: Request,
    response: Response,
    state: JobState | None = None,
    kind: str | None = Query(default=None, max_length=50),
    target: str | None = Query(default=None, max_length=200),
    limit: int = Query(default=100, ge=1, le=1000),
    after: str | None = Query(default=None, max_length=64, description="the job id the last page ended at"),
    _: Principal = Depends(reader),
    s: Session = Depends(session, scope="function"),
) -> list[JobOut]:
    """Newest first, a page at a time (see `paging`); filterable by state, kind and target."""
    rows = find_jobs(s, state, kind, target, limit + 1, after)
    return [job_view(s, j) for j in page(rows, limit, request, response, lambda j: j.id)]


@router.get("/{job_id}")
def show_job(
    job_id: str, _: Principal = Depends(reader), s: Session = Depends(session, scope="function")
) -> JobOut:
    job = s.get(Job, job_id)
    if job is None:
        raise not_found("job", job_id)
    return job_view(s, job)


@router.post("/{job_id}/cancel")
def cancel(job_id: str, _: Principal = Depends(operator)) -> dict[str, str]:
    engine.cancel_job(job_id)
    return {"job_id": job_id, "state": JobState.CANCELLED}


@router.post("/{job_id}/resume")
def resume(job_id: str, _: Principal = Depends(operator)) -> dict[str, str]:
    engine.resume_job(job_id)
    return {"job_id": job_id, "state": "resuming"}
