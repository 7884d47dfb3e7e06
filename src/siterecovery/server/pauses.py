"""How long a server process stopped answering: event-loop lag and garbage-collector pauses.

A heartbeat's tail latency at thousands of components is made of spells when the process's event
loop cannot run: a collection holding the GIL, another thread of the process (the RPO monitor's
pass, a page of the item list on a worker thread) holding it, or the machine's cores busy with
other processes. Throughput and percentiles do not say which; these counters do. The loop's lag
is measured by a task that sleeps `TICK` and notes how late it woke; a collection's pause by
`gc.callbacks` (start to stop, in whichever thread collected). Both count the spells of at least
`SPELL` seconds and keep the longest; they are this process's own since it started and are served
with the heartbeat counters (`GET /api/cluster/self`, `heartbeats`), which the scale bench prints
per process.
"""

from __future__ import annotations

import asyncio
import gc
import time
from typing import Any

from siterecovery.control.api.components import COUNTS, HeartbeatCounts

TICK = 0.01  # the loop-lag task's sleep: a finer tick costs a wake-up per tick
SPELL = 0.05  # what counts as a spell: half the heartbeat p99 target (docs/operations.md)


class PauseWatch:
    """Counts loop-lag spells and collector pauses into `counts`."""

    def __init__(self, counts: HeartbeatCounts = COUNTS) -> None:
        self.counts = counts
        self._collecting_since: float | None = None

    def collector(self, phase: str, info: dict[str, Any], clock: float | None = None) -> None:
        """A `gc.callbacks` entry: `phase` is "start" or "stop" of one collection."""
        at = time.monotonic() if clock is None else clock
        if phase == "start":
            self._collecting_since = at
            return
        since, self._collecting_since = self._collecting_since, None
        if since is not None:
            self.paused(at - since, int(info.get("generation", -1)))

    def paused(self, seconds: float, generation: int = -1) -> None:
        """A collection (of `generation`: 2 is a full one) that held the GIL for `seconds`."""
        ms = round(1000 * seconds, 1)
        if ms > self.counts.gc_pause_max_ms:
            self.counts.gc_pause_max_ms, self.counts.gc_pause_max_generation = ms, generation
        if seconds >= SPELL:
            self.counts.gc_pauses += 1

    def lagged(self, seconds: float) -> None:
        """The loop ran a timer `seconds` after it was due."""
        ms = round(1000 * seconds, 1)
        self.counts.loop_lag_max_ms = max(self.counts.loop_lag_max_ms, ms)
        if seconds >= SPELL:
            self.counts.loop_lags += 1

    async def watch_loop(self) -> None:
        """Runs on the serving loop until cancelled."""
        loop = asyncio.get_running_loop()
        while True:
            due = loop.time() + TICK
            await asyncio.sleep(TICK)
            self.lagged(max(0.0, loop.time() - due))


WATCH = PauseWatch()


def watch_collector() -> None:
    """Time every collection of this process from now on (once per process)."""
    if WATCH.collector not in gc.callbacks:
        gc.callbacks.append(WATCH.collector)
