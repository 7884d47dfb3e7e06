"""Admission of heartbeats: an overloaded server answers "later", it never stalls.

Thousands of components heartbeat every few seconds. When they come faster than the database
can take them, queueing them all would make every request — heartbeats, the portal, jobs — wait
on the connection pool until they time out together. Instead at most `limit` heartbeats are
handled at once per process; one that finds no slot waits up to `max_wait` seconds for one, and
is then answered `503 Service Unavailable` with `Retry-After`. The component keeps its last desired
state and comes back after Retry-After stretched by random jitter (`dataplane.control_client`),
which spreads the shed ones over the next interval. Other routes are not limited.

This is the application's outermost layer (`server.app`): the decision is taken on the path
alone, before the token is looked up and before the body is read, so a shed heartbeat costs
about what the HTTP server spends on any request (a token not in the token cache would cost a
database lookup, and a refused one an event) — and a shed request changes nothing, so refusing
it before authentication tells the caller only that the server is busy.

Retry-After is the caller's own heartbeat interval (it says it in `X-Heartbeat-Interval`), longer
by up to half while many heartbeats are being shed: a shed component never comes back sooner than
it would have heartbeat anyway (at 5 s for everyone, a shed 10 s agent came back twice as often
as an admitted one, and shedding fed the load it was meant to relieve).
"""

from __future__ import annotations

import asyncio
import math
import os
import re
import time

from starlette.types import ASGIApp, Receive, Scope, Send

from siterecovery.control.problems import problem_response
from siterecovery.errors import Problem, Status

HEARTBEAT_PATH = re.compile(r"^/api/components/[^/]+/heartbeat$")


def default_limit() -> int:
    """Heartbeats handled at once unless told (read when the app is built, never at import time)."""
    return int(os.environ.get("SITERECOVERY_HEARTBEAT_CONCURRENCY", "16"))


DEFAULT_MAX_WAIT = 2.0
# A caller that does not say its interval: the shortest idle one (process servers, master targets).
RETRY_AFTER_SECONDS = 5
INTERVAL_HEADER = b"x-heartbeat-interval"
SHORTEST, LONGEST = 1.0, 60.0  # what a caller's stated interval is clamped to
WINDOW = 10.0  # seconds per bucket of the shed fraction (two buckets: the last 10-20 s)
# Retry-After grows by up to this part of the interval as the shed fraction goes to 1. With the
# components' jitter (0-100 %) a shed agent (10 s) comes back 10-30 s later: later than its
# interval, and at worst as late as the 30 s `heartbeat_timeout` allows for one lost beat.
STRETCH = 0.5


class ShedRate:
    """The fraction of heartbeats shed over the last 10-20 s (two 10 s buckets)."""

    def __init__(self, window: float = WINDOW) -> None:
        self.window = window
        self._start = time.monotonic()
        self._now = [0, 0]  # admitted, shed in the current bucket
        self._before = [0, 0]  # in the one before

    def _roll(self) -> None:
        clock = time.monotonic()
        if clock - self._start >= self.window:
            self._before = self._now if clock - self._start < 2 * self.window else [0, 0]
            self._now, self._start = [0, 0], clock

    def count(self, shed: bool) -> None:
        self._roll()
        self._now[1 if shed else 0] += 1

    def fraction(self) -> float:
        self._roll()
        admitted, shed = self._now[0] + self._before[0], self._now[1] + self._before[1]
        return shed / (admitted + shed) if admitted + shed else 0.0


def retry_after(interval: float | None, shed_fraction: float) -> int:
    """Whole seconds: the caller's interval (or `RETRY_AFTER_SECONDS`), stretched with shedding."""
    base = RETRY_AFTER_SECONDS if interval is None else min(max(interval, SHORTEST), LONGEST)
    return math.ceil(base * (1.0 + STRETCH * min(max(shed_fraction, 0.0), 1.0)))


def stated_interval(scope: Scope) -> float | None:
    """The heartbeat interval the caller says it keeps (`X-Heartbeat-Interval`), if a number."""
    for name, value in scope.get("headers", ()):
        if name == INTERVAL_HEADER:
            try:
                seconds = float(value)
            except ValueError:
                return None
            return seconds if math.isfinite(seconds) else None
    return None


class HeartbeatAdmission:
    """ASGI middleware: at most `limit` heartbeats in flight, the others delayed, then shed."""

    def __init__(self, app: ASGIApp, limit: int | None = None, max_wait: float = DEFAULT_MAX_WAIT) -> None:
        self.app = app
        self.limit = max(1, default_limit() if limit is None else limit)
        self.max_wait = max_wait
        self.shed = 0  # heartbeats answered 503 since start (for the bench and tests)
        self.rate = ShedRate()
        self._slots: asyncio.Semaphore | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not HEARTBEAT_PATH.match(scope.get("path", "")):
            await self.app(scope, receive, send)
            return
        if self._slots is None:  # created in the server's event loop
            self._slots = asyncio.Semaphore(self.limit)
        slots = self._slots
        if not slots.locked():
            # A free slot is taken at once: no timer at all.
            await slots.acquire()
        else:
            try:
                # A timer on this task (`wait_for` would also make a task per waiting request).
                async with asyncio.timeout(self.max_wait):
                    await slots.acquire()
            except TimeoutError:
                self.shed += 1
                self.rate.count(shed=True)
                await _busy(send, retry_after(stated_interval(scope), self.rate.fraction()))
                return
        self.rate.count(shed=False)
        try:
            await self.app(scope, receive, send)
        finally:
            slots.release()


_BUSY: dict[int, tuple[bytes, list[tuple[bytes, bytes]]]] = {}  # Retry-After -> body, headers


async def _busy(send: Send, seconds: int) -> None:
    """Answer 503 `server-busy`; the answer for each Retry-After is built once (it never varies),
    so shedding costs two sends, not a JSON encoding per shed heartbeat."""
    answer = _BUSY.get(seconds)
    if answer is None:
        response = problem_response(
            int(Status.UNAVAILABLE),
            (
                Problem(
                    "server-busy",
                    "The configuration server is handling as many heartbeats as it can.",
                    f"Retry after {seconds} s (components do so with jitter).",
                ),
            ),
        )
        response.headers["Retry-After"] = str(seconds)
        answer = _BUSY[seconds] = (bytes(response.body), list(response.raw_headers))
    body, headers = answer
    await send({"type": "http.response.start", "status": int(Status.UNAVAILABLE), "headers": headers})
    await send({"type": "http.response.body", "body": body})
