"""Sync blocks are acknowledged cut-through: the process server does not fsync them into its cache,
so the agent hears they are durable only from the master target's ACK (`process_server.py`).

The writer is `tests.nbd_writer` (a stdlib NBD client, not the project's code) writing
self-verifying records with a FLUSH every 16 and reconnecting as needed.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

from tests.dataplane.conftest import (
    Plane,
    compare_raw,
    one_pair,
    pair_stats,
    wait_for,
    wait_fresh_stats,
    wait_replicated,
)
from tests.nbd_writer import RecordWriter, verify_records

MiB = 1 << 20
SIZE = 48 * MiB
RANDOM = 32 * MiB  # random data to copy (the rest is sparse)
BASE = 40 * MiB  # the records' region: slots of 4 KiB from here, inside what the sync reads
FINE = 4096  # one sequence number per 4 KiB of disk in a sync's window


def _cached_bytes(cache_dir: Path) -> int:
    return sum(p.stat().st_size for p in cache_dir.rglob("*.seg") if p.exists())


def test_ps_kill_9_during_initial_sync_under_writer(plane: Plane) -> None:
    """kill -9 of the process server while an initial sync's blocks sit unfsynced in its cache,
    then again under a writer: every flushed record reaches the replica and it equals the source.

    The master target starts only after the kill, so the blocks cannot have been applied: the
    agent must not hear that they are durable before the writer starts (its captured writes make
    the process server fsync its cache, which covers the blocks before them too).
    """
    src = plane.root / "src.img"
    with open(src, "wb") as f:
        f.truncate(SIZE)
        for at in range(0, RANDOM, 4 * MiB):
            f.seek(at)
            f.write(os.urandom(4 * MiB))
    target = plane.root / "target.img"
    mt, ps, agent = one_pair(plane, src, target, SIZE, master_target_up=False)
    # The agent has sent the whole sync (its random data cached at the process server) ...
    wait_for(lambda: _cached_bytes(ps.state_dir) >= RANDOM, 120, "the sync's blocks in the cache")
    wait_fresh_stats(agent)
    stats = pair_stats(agent, "p1")
    # ... and with the master target away, is told none of it is durable.
    acked = int(stats.get("acked_seq", -1))  # type: ignore[call-overload]
    assert stats.get("state") == "initial-sync" and acked < RANDOM // FINE, stats
    # Killed with them unfsynced: the restarted process server drops them (its volatile mark) and
    # the agent sends them again.
    ps.kill(signal.SIGKILL)
    ps.start()
    writer = RecordWriter(plane.root / "nbd" / "d0.sock", "d0", BASE, slots=(SIZE - BASE) // FINE).start()
    try:
        writer.wait_flushed(64)
        ps.kill(signal.SIGKILL)
        ps.start()
        writer.wait_flushed(writer.flushed + 128)
        mt.start()
        writer.wait_flushed(writer.flushed + 64)
    finally:
        writer.stop()
    assert writer.error is None, writer.error
    flushed = writer.flushed
    wait_replicated(agent, mt, "p1", timeout=180)
    verdict = verify_records(target, BASE, flushed, seed=1)
    assert verdict.first_bad is None, (
        f"replica holds {verdict.valid} of {flushed} flushed records; slot {verdict.first_bad} is "
        f"{verdict.why}"
    )
    assert compare_raw(src, target) == 0
