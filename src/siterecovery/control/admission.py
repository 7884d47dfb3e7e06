"""Admission of heartbeats: an overloaded server answers "later", it never stalls.

Thousands of components heartbeat every few seconds. When they come faster than the database
can take them, queueing them all would make every request — heartbeats, the portal, jobs — wait
on the connection pool until they time out together. Instead at most `limit` heartbeats are
handled at once per process; one that finds no slot waits up to `max_wait` seconds for one, and
is then answered `503 Service Unavailable` with `Retry-After`. The component keeps its last desired
state and comes back after Retry-After stretched by random jitter (`dataplane.control_client`),
which spreads the shed ones over the next interval. Other routes are not limited.
"""

from __future__ import annotations

import asyncio
import os
import re

from starlette.types import ASGIApp, Receive, Scope, Send

from siterecovery.control.problems import problem_response
from siterecovery.errors import Problem, Status

HEARTBEAT_PATH = re.compile(r"^/api/components/[^/]+/heartbeat$")


def default_limit() -> int:
    """Heartbeats handled at once unless told (read when the app is built, never at import time)."""
    return int(os.environ.get("SITERECOVERY_HEARTBEAT_CONCURRENCY", "16"))


DEFAULT_MAX_WAIT = 2.0
# Components come back after this, stretched by up to 100 % (`retry.after_busy`). At 2 s an idle
# agent (10 s interval) that was shed came back sooner than it would have heartbeat anyway, so
# shedding multiplied the load it was meant to relieve (bench_scale, 5,000 agents); 5-10 s keeps
# a process server or master target (5 s interval) shed twice in a row within the 30 s timeout.
RETRY_AFTER_SECONDS = 5


class HeartbeatAdmission:
    """ASGI middleware: at most `limit` heartbeats in flight, the others delayed, then shed."""

    def __init__(self, app: ASGIApp, limit: int | None = None, max_wait: float = DEFAULT_MAX_WAIT) -> None:
        self.app = app
        self.limit = max(1, default_limit() if limit is None else limit)
        self.max_wait = max_wait
        self.shed = 0  # heartbeats answered 503 since start (for the bench and tests)
        self._slots: asyncio.Semaphore | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not HEARTBEAT_PATH.match(scope.get("path", "")):
            await self.app(scope, receive, send)
            return
        if self._slots is None:  # created in the server's event loop
            self._slots = asyncio.Semaphore(self.limit)
        try:
            await asyncio.wait_for(self._slots.acquire(), timeout=self.max_wait)
        except TimeoutError:
            self.shed += 1
            await _busy(scope, receive, send)
            return
        try:
            await self.app(scope, receive, send)
        finally:
            self._slots.release()


async def _busy(scope: Scope, receive: Receive, send: Send) -> None:
    response = problem_response(
        int(Status.UNAVAILABLE),
        (
            Problem(
                "server-busy",
                "The configuration server is handling as many heartbeats as it can.",
                f"Retry after {RETRY_AFTER_SECONDS} s (components do so with jitter).",
            ),
        ),
    )
    response.headers["Retry-After"] = str(RETRY_AFTER_SECONDS)
    await response(scope, receive, send)
