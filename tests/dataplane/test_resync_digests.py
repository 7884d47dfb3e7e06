"""Resyncs answered from the master target's block digests, end to end (real processes, mTLS).

A pair the master target replicated itself is resynced by reading the source only (the replica's
digests were kept on apply and persisted across a restart); after a kill -9 of the master target
the digests of what was being written are never trusted, so a resync still finds a difference
hidden there; and zero ranges never travel as data."""

from __future__ import annotations

import os
import signal
from pathlib import Path

from tests.dataplane.conftest import (
    Component,
    Plane,
    applied_seq,
    compare_raw,
    free_addresses,
    pair_stats,
    random_image,
    replication,
    wait_for,
    wait_generation,
    wait_replicated,
    write_json,
)

from siterecovery.dataplane.sender_process import PID_FILE

MiB = 1 << 20


def _start(plane: Plane, src: Path, size: int) -> tuple[Component, Component, Component, Path, list[str]]:
    ps_addr, mt_addr = free_addresses(2)
    target = plane.root / "target.img"
    mt = plane.master_target([{"pair_id": "p1", "path": str(target), "size": size}], listen=mt_addr).start()
    ps = plane.process_server(listen=ps_addr).start()
    ps.wait_address()
    mt.wait_address()
    agent = plane.agent([replication("p1", "d0", ps_addr, mt_addr)], {"d0": src}).start()
    return agent, ps, mt, target, [ps_addr, mt_addr]


def _rewrite(src: Path, offsets: list[int]) -> int:
    with open(src, "r+b") as f:
        for off in offsets:
            f.seek(off)
            f.write(os.urandom(4096))
    return 4096 * len(offsets)


def _resync(plane: Plane, agent: Component, mt: Component, addrs: list[str]) -> int:
    """Raise the pair's generation (sync mode delta) and wait for the resync; bytes it sent."""
    before = pair_stats(agent, "p1")
    spec = {**replication("p1", "d0", addrs[0], addrs[1], "delta"), "generation": 2}
    write_json(plane.root / "agent-assignments.json", {"replications": [spec]})
    wait_generation(agent, "p1", 2)
    wait_replicated(agent, mt, "p1")
    return int(pair_stats(agent, "p1")["bytes_sent"]) - int(before["bytes_sent"])  # type: ignore[call-overload]


def _replica_read(mt: Component) -> int:
    for p in mt.stats().get("pairs", []):  # type: ignore[union-attr]
        if p["pair_id"] == "p1":  # type: ignore[index]
            return int(p.get("replica_bytes_read", 0))  # type: ignore[union-attr]
    raise AssertionError("no stats of p1 from the master target")


def test_resync_reads_only_the_source_with_digests_kept_across_a_restart(plane: Plane) -> None:
    size = 48 * MiB
    src = random_image(plane.root / "src.img", size, [(0, 20 * MiB), (30 * MiB, 6 * MiB)])
    agent, _ps, mt, target, addrs = _start(plane, src, size)
    wait_replicated(agent, mt, "p1")
    mt.kill(signal.SIGTERM)  # a clean stop: the digests are persisted and the replica's identity noted
    mt.start()
    mt.wait_address()
    changed = _rewrite(src, [4096, 3 * MiB + 8192, 19 * MiB, 31 * MiB + 4096, 40 * MiB])
    child = (agent.state_dir / "pairs" / "p1" / PID_FILE).read_text()
    sent = _resync(plane, agent, mt, addrs)
    assert compare_raw(src, target) == 0
    # No sync was pending: the running sender took the resync up (no new child, no new links).
    assert (agent.state_dir / "pairs" / "p1" / PID_FILE).read_text() == child
    assert _replica_read(mt) == 0, "the master target read its replica instead of using its digests"
    assert sent < changed + 64 * 1024, f"{sent} bytes sent for {changed} changed"


def test_kill_9_of_the_master_target_never_lets_stale_digests_hide_a_difference(plane: Plane) -> None:
    size = 64 * MiB  # one digest extent: the one being written when the master target dies
    src = random_image(plane.root / "src.img", size, [(0, 40 * MiB)])
    agent, _ps, mt, target, addrs = _start(plane, src, size)
    wait_for(lambda: applied_seq(mt, "p1") >= 0, 60, "the master target to apply")
    mt.kill(signal.SIGKILL)  # mid-apply (or just after: its extents are still marked)
    mt.start()
    mt.wait_address()
    wait_replicated(agent, mt, "p1")
    mt.kill(signal.SIGKILL)
    # A write that reached the replica without its digest (what a crash mid-apply can leave):
    # the source never changed there, so only a distrusted digest finds it.
    with open(target, "r+b") as f:
        f.seek(10 * MiB)
        f.write(os.urandom(4096))
    mt.start()
    mt.wait_address()
    _rewrite(src, [MiB, 20 * MiB + 4096])
    _resync(plane, agent, mt, addrs)
    assert compare_raw(src, target) == 0, "a stale digest hid a difference"
    assert _replica_read(mt) > 0


def test_zero_ranges_are_not_sent_as_data(plane: Plane) -> None:
    size = 32 * MiB
    src = random_image(plane.root / "src.img", size, [(0, 4 * MiB)])
    with open(src, "r+b") as f:  # allocated zeroes: data on the disk, zeroes in content
        f.seek(8 * MiB)
        f.write(bytes(12 * MiB))
        os.fsync(f.fileno())
    agent, _ps, mt, target, _addrs = _start(plane, src, size)
    wait_replicated(agent, mt, "p1")
    assert compare_raw(src, target) == 0
    sent = int(pair_stats(agent, "p1")["bytes_sent"])  # type: ignore[call-overload]
    assert sent < 4 * MiB + 256 * 1024, f"{sent} bytes sent for 4 MiB of data"
    allocated = os.stat(target).st_blocks * 512
    assert allocated <= 5 * MiB, f"the replica allocates {allocated} bytes for 4 MiB of data"
