"""A server process made ready for heartbeats it has not met yet: tokens, kinds, desired states.

An idle component's heartbeat is cheap once its process knows it: the token is in the token cache,
the component's kind is known, its desired state is built (the lean path, `heartbeat_front`). The
first heartbeat of each component on a process knew none of these: a session and a token lookup on
a worker thread, another session for the kind, a desired state built alone — ~10 times an idle
heartbeat. After a restart, or after thousands of registrations, every component's first heartbeat
came within one interval: the process saturated and shed (1,700 heartbeats at 5,000 agents).

So a process learns every component at once:
- before it serves (`warm_process`): every component's token and kind in one statement, every
  desired state in one bulk build (`dr.desired_bulk.build_all`);
- when a heartbeat's token is not remembered (`Warmer.after_miss`): the tokens and kinds again, in
  one statement on a worker thread, the heartbeats missing meanwhile waiting for that one load. A
  token that is still unknown after it (a new registration is caught by the next load; a revoked,
  expired or unknown token is refused by the full stack as before) costs nothing more until loads are
  due again: at least `MIN_GAP` seconds apart and `SPACING` times a load's length, so garbage
  tokens cannot make a process reload its tokens more than a small share of its time.
A load that meets more than `dr.desired_bulk.BULK_MIN` tokens new to the process (a burst of
registrations, which also changed the desired epoch) builds every desired state in bulk at once,
unless one is fresh or was built moments ago; other desired states missing are built by the
heartbeats themselves (`dr.desired_bulk.cold_desired`), as before.
"""

from __future__ import annotations

import asyncio
import logging
import time

from starlette.concurrency import run_in_threadpool

from siterecovery.control.api.components import COUNTS, remember_kinds
from siterecovery.dr.desired_bulk import build_all, build_for_newcomers
from siterecovery.store import desired_epoch
from siterecovery.store.context import ControlPlane

log = logging.getLogger("siterecovery.warm")

MIN_GAP = 2.0  # seconds between two loads at least...
SPACING = 10.0  # ...and this many times the last load's length


def load_components(cp: ControlPlane, bulk: bool = True) -> int:
    """Remember every component's token and kind (one statement); returns how many components.
    When many were new to this process (a burst of registrations), every desired state is built
    in bulk too, under the epoch read before the tokens (`dr.desired_bulk.build_for_newcomers`)."""
    with cp.db.session() as s:
        # The epoch first, as a token's lookup keeps it: a token changed after it gives a new one.
        epoch = desired_epoch.read(s)
        kinds, newcomers = cp.tokens.remember_components(s, epoch)
    remember_kinds(kinds)
    if bulk:
        build_for_newcomers(cp.db, epoch, newcomers)
    return len(kinds)


def warm_process(cp: ControlPlane) -> None:
    """Make this process ready for every registered component's heartbeat, before it serves."""
    started = time.monotonic()
    components = load_components(cp, bulk=False)
    states = build_all(cp.db)
    log.info(
        "ready for %d components (%d desired states) in %.2f s",
        components,
        states,
        time.monotonic() - started,
    )


class Warmer:
    """This process's loads of every component's token after a miss: one at a time, spaced."""

    def __init__(self) -> None:
        self._running: asyncio.Task[int] | None = None
        self._ended = -1e9  # monotonic
        self._length = 0.0

    async def after_miss(self, cp: ControlPlane) -> bool:
        """Load every component's token unless one was loaded too recently (or wait for the load
        running); True when a load ended since the call, so the token cache is worth asking again."""
        running = self._running
        if running is None:
            if time.monotonic() - self._ended < max(MIN_GAP, SPACING * self._length):
                return False
            running = self._running = asyncio.ensure_future(self._load(cp))
        try:
            await asyncio.shield(running)
        except Exception:  # the database unreachable: the full stack answers (and says why)
            log.warning("loading every component's token failed", exc_info=True)
            return False
        return True

    async def _load(self, cp: ControlPlane) -> int:
        started = time.monotonic()
        try:
            return await run_in_threadpool(load_components, cp)
        finally:
            self._ended = time.monotonic()
            self._length = self._ended - started
            self._running = None
            COUNTS.token_loads += 1
