"""The process server's acknowledgements to an agent, synced and sent on a thread of their own.

The session thread used to fsync the cache itself before each ACK (every `ACK_EVERY_BYTES`, or
when the agent's stream paused), and read nothing meanwhile: the agent's frames backed up behind
the fsync and the sender stalled (issue 16). Now the session thread only asks (`request`) and goes
on receiving; the `Acker` thread fsyncs the cache and then acknowledges, per pair, the newest
sequence appended before that fsync began. PS-1 holds as before: nothing is acknowledged that a
crash could lose. A pair's frames held in memory (`ps_inflight.py`) are not covered by the fsync:
`sync` returns the newest sequence it made durable, and no more than that is acknowledged.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)


class Acker:
    """Syncs and acknowledges a session's pairs when asked (see the module's paragraph).

    `sync(idx)` makes pair `idx`'s cache durable and returns the newest sequence durable (with every
    one before it); `ack(idx, seq)` tells the agent; `broken()` is called once if either raises
    OSError (the session must end: the agent resends after HELLO).
    """

    def __init__(
        self,
        name: str,
        sync: Callable[[int], int],
        ack: Callable[[int, int], None],
        broken: Callable[[], None],
    ) -> None:
        self._sync = sync
        self._ack = ack
        self._broken = broken
        self._asked: dict[int, int] = {}  # pair index -> newest sequence appended, to acknowledge
        self._cond = threading.Condition()
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name=f"ps-ack-{name}", daemon=True)
        self._thread.start()

    def request(self, touched: dict[int, int]) -> None:
        """Acknowledge these pairs' sequences (already appended to their caches) once durable."""
        with self._cond:
            for idx, seq in touched.items():
                self._asked[idx] = max(seq, self._asked.get(idx, -1))
            self._cond.notify()

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: bool(self._asked) or self._stopped)
                if self._stopped:
                    return
                asked, self._asked = self._asked, {}
            try:
                for idx, seq in asked.items():
                    # Covers every frame appended before it began, `seq` included unless held.
                    durable = min(seq, self._sync(idx))
                    if durable >= 0:
                        self._ack(idx, durable)
            except OSError as exc:
                log.info("acknowledging the agent failed: %s", exc)
                self._broken()
                return

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify()
        self._thread.join(timeout=30)
