"""A server process counts the spells its event loop could not run (`server.pauses`), and hands
the GIL over every millisecond (`server.main.SWITCH_INTERVAL`)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time

from siterecovery.control.api.components import HeartbeatCounts
from siterecovery.server.pauses import SPELL, PauseWatch


def test_a_collection_of_a_spells_length_is_counted_and_a_short_one_only_timed() -> None:
    counts = HeartbeatCounts()
    watch = PauseWatch(counts)
    watch.collector("start", {"generation": 0}, clock=10.0)
    watch.collector("stop", {"generation": 0}, clock=10.0 + SPELL / 5)
    assert (counts.gc_pauses, counts.gc_pause_max_ms) == (0, round(1000 * SPELL / 5, 1))
    watch.collector("start", {"generation": 2}, clock=20.0)
    watch.collector("stop", {"generation": 2}, clock=20.25)
    assert (counts.gc_pauses, counts.gc_pause_max_ms, counts.gc_pause_max_generation) == (1, 250.0, 2)
    watch.collector("start", {"generation": 0}, clock=21.0)
    watch.collector("stop", {"generation": 0}, clock=21.1)  # counted, not the longest
    assert (counts.gc_pauses, counts.gc_pause_max_ms, counts.gc_pause_max_generation) == (2, 250.0, 2)
    watch.collector("stop", {"generation": 0}, clock=30.0)  # no start seen (installed mid-collection)
    assert counts.gc_pauses == 2


def test_a_loop_blocked_longer_than_a_spell_is_counted() -> None:
    counts = HeartbeatCounts()
    watch = PauseWatch(counts)

    async def main() -> None:
        task = asyncio.create_task(watch.watch_loop())
        await asyncio.sleep(0.05)  # the watch is sleeping on its tick
        time.sleep(3 * SPELL)  # the loop blocked: its timer runs at least 2 spells late
        await asyncio.sleep(0.05)  # the watch wakes and notes it
        task.cancel()

    asyncio.run(main())
    assert counts.loop_lags >= 1
    assert counts.loop_lag_max_ms >= 1000 * 2 * SPELL


def test_the_server_hands_the_gil_over_every_millisecond_and_times_collections() -> None:
    # In a child: the switch interval and the collector callback are the process's.
    code = (
        "import gc, sys; from siterecovery.server.main import SWITCH_INTERVAL, share_the_interpreter;"
        "from siterecovery.server.pauses import WATCH;"
        "assert sys.getswitchinterval() == 0.005; share_the_interpreter();"
        "assert sys.getswitchinterval() == SWITCH_INTERVAL == 0.001, sys.getswitchinterval();"
        "share_the_interpreter(); assert gc.callbacks.count(WATCH.collector) == 1;"
        "gc.collect(); assert WATCH.counts.gc_pause_max_ms > 0"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
