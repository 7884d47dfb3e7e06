"""`GET /api/cluster/self`: what this server process is in its cluster (see `store.cluster`).

Answered by whichever process the request reaches: its DBOS executor id, whether it currently
does the periodic work, how many periodic passes it ran, which dead processes' jobs it took over,
how it answered heartbeats (the lean path or the full stack, tokens loaded, desired states built alone).
"""

from __future__ import annotations

import os

from fastapi import APIRouter, Depends
from pydantic import BaseModel

from siterecovery.control.api.components import COUNTS, HeartbeatCounts
from siterecovery.control.api.deps import reader
from siterecovery.store.cluster import current_cluster
from siterecovery.store.tokens import Principal

router = APIRouter(prefix="/api/cluster", tags=["server"])


class ProcessOut(BaseModel):
    executor_id: str
    leader: bool
    periodic_passes: int
    recovered_executors: list[str]
    pass_seconds_p50: float | None = None
    pass_seconds_max: float | None = None
    pid: int
    heartbeats: HeartbeatCounts  # how this process answered heartbeats since it started


@router.get("/self")
def this_process(_: Principal = Depends(reader)) -> ProcessOut:
    cluster = current_cluster()
    if cluster is None:  # in-process app without the server loop (tests): a lone process
        return ProcessOut(
            executor_id="",
            leader=False,
            periodic_passes=0,
            recovered_executors=[],
            pid=os.getpid(),
            heartbeats=COUNTS,
        )
    st = cluster.status()
    return ProcessOut(
        executor_id=st.executor_id,
        leader=st.leader,
        periodic_passes=st.periodic_passes,
        recovered_executors=st.recovered_executors,
        pass_seconds_p50=st.pass_seconds_p50,
        pass_seconds_max=st.pass_seconds_max,
        pid=os.getpid(),
        heartbeats=COUNTS,
    )
