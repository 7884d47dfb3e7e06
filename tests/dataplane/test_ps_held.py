"""Frames the process server forwards from memory are acknowledged only on the master target's
ACK (`ps_inflight.py`): a kill -9 while it holds them loses no flushed record (PS-1).

The writer is not our code: `qemu-io` (`tests/qemu_io_writer.py`), self-verifying records flushed
every 16. The master target is stopped (SIGSTOP) so that nothing the process server forwards is
acknowledged; then the process server and the master target are both killed with kill -9 — the
frames held in the process server's memory, and those in the master target's socket buffers, die
with them. Had the process server acknowledged a held frame before the master target did, the agent
would have freed it from its spool and the replica would lack its record.
"""

from __future__ import annotations

import signal

from tests.dataplane.conftest import (
    Plane,
    compare_raw,
    make_image,
    one_pair,
    pair_stats,
    wait_for,
    wait_replicated,
)
from tests.qemu_io_writer import QemuIoWriter, Records, bad_records

MiB = 1 << 20
SIZE = 16 * MiB
BASE = 4 * MiB  # the records' region: slots of 4 KiB from here
SLOTS = 256


def _seq(stats: dict[str, object], key: str) -> int:
    return int(stats.get(key, -1))  # type: ignore[call-overload]


def test_kill_9_while_frames_are_held_in_memory_loses_no_flushed_record(plane: Plane) -> None:
    src = make_image(plane.root / "src.img", SIZE, [(0, 1 * MiB, 0x42)])
    target = plane.root / "target.img"
    mt, ps, agent = one_pair(plane, src, target, SIZE)
    wait_replicated(agent, mt, "p1")  # the link to the master target is up, the cache forwarded
    assert mt.proc is not None
    mt.proc.send_signal(signal.SIGSTOP)  # from now on nothing is acknowledged downstream
    writer = QemuIoWriter(
        plane.root / "nbd" / "d0.sock",
        SLOTS,
        base=BASE,
        kind=Records.UNIQUE,
        workdir=plane.root / "records",
        batch=128,
        flush_every=16,
    ).start()
    writer.join()
    assert writer.flushed == SLOTS

    def held_unacknowledged() -> bool:
        held = _seq(ps.stats(), "held_bytes")
        p = pair_stats(agent, "p1")
        return held > 0 and _seq(p, "acked_seq") < _seq(p, "captured_seq")

    # The records are in the process server's memory, and the agent still keeps them spooled.
    wait_for(held_unacknowledged, 60, "the process server to hold the records in memory")
    ps.kill(signal.SIGKILL)
    mt.kill(signal.SIGKILL)  # stopped: its socket buffers (what was forwarded) die with it
    mt.start()
    ps.start()
    wait_replicated(agent, mt, "p1", timeout=120)
    bad = bad_records(target, BASE, SLOTS, Records.UNIQUE)
    assert not bad, f"{len(bad)} of {SLOTS} flushed records missing or torn on the replica, first {bad[:8]}"
    assert compare_raw(src, target) == 0
