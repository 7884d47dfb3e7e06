"""An idle disk's pair reports nothing outstanding once its sync is done.

A sync reserves a window of sequence numbers up front (one per 4 KiB block) and most of them are
never carried by a frame; a restarted agent skips to the mark it had reserved. The pair's report
must not count those numbers as captured and unacknowledged: a planned failover's drain refuses
(`drain-incomplete`) while the agent's last report says captured > acknowledged, and the RPO
monitor and the stall alert compare the same number with what the master target applied.

Seen as `tests/faults/test_kills.py` failing `drain-incomplete` on a loaded box: a resync of the
writer's disk ended after its last record, with no crash bookmark between it and the shutdown (a
crash bookmark's frame carries a number past the window, which hid the bug whenever one came).
"""

from __future__ import annotations

import json
import signal
from pathlib import Path

from tests.dataplane.conftest import (
    Plane,
    free_addresses,
    make_image,
    pair_stats,
    replication,
    wait_replicated,
)

from siterecovery.dataplane.assignments import DiskReplication
from siterecovery.dataplane.replica import PairReplication

MiB = 1 << 20


def _behind(pair: PairReplication) -> int:
    stats = pair.stats()
    return stats.captured_seq - stats.acked_seq


def test_a_done_sync_leaves_nothing_captured_but_unacknowledged(tmp_path: Path) -> None:
    image = make_image(tmp_path / "d0.img", MiB, [(0, 8192, 0x41)])
    spec = DiskReplication(pair_id="p1", disk="d0", process_server="127.0.0.1:1", master_target="127.0.0.1:2")
    pair = PairReplication(spec, image, tmp_path / "state")
    plan = pair.sync
    assert plan is not None and _behind(pair) > 0  # the initial sync is pending
    last = plan.seq_for(MiB - 4096)  # the sync's last frame: the zero range at the end of the disk
    pair.sync_generated(last)
    pair.on_ack(last)
    assert pair.drained() and _behind(pair) == 0, pair.stats()

    seq = pair.record_write(0, memoryview(bytes(4096)))  # a write is outstanding until acknowledged
    pair.settle()
    assert _behind(pair) > 0
    pair.on_ack(seq)
    assert _behind(pair) == 0

    # A resync after an unclean stop that finds nothing to send (`sync_generated(None)`) and one
    # that sends a block at the start of its window: both done, nothing outstanding.
    pair.request_resync([(0, 4096)])
    assert _behind(pair) > 0
    pair.sync_generated(None)
    assert pair.drained() and _behind(pair) == 0, pair.stats()
    pair.request_resync([(0, 4096)])
    resync = pair.sync
    assert resync is not None
    pair.sync_generated(resync.seq_for(0))
    pair.on_ack(resync.seq_for(0))
    assert pair.drained() and _behind(pair) == 0, pair.stats()

    # A restart skips to the reserved mark; with the spool empty nothing is outstanding.
    pair.flush()
    pair.spool.close()
    again = PairReplication(spec, image, tmp_path / "state")
    assert again.captured_seq > resync.seq_for(0)
    assert again.stats().captured_seq <= again.stats().acked_seq


def test_the_agent_s_last_report_of_an_idle_disk_is_drained(plane: Plane) -> None:
    """The real agent, process server and master target: after the initial sync of a disk nobody
    writes (no crash bookmarks: they would hide it), the agent's report, and the last one it writes
    as it stops (what a planned failover's drain reads), say everything captured was acknowledged."""
    src = make_image(plane.root / "src.img", 4 * MiB, [(0, MiB, 0x42)])
    ps_addr, mt_addr = free_addresses(2)
    mt = plane.master_target([{"pair_id": "p1", "path": str(plane.root / "target.img"), "size": 4 * MiB}])
    mt.args[mt.args.index("--listen") + 1] = mt_addr
    mt.start()
    ps = plane.process_server(listen=ps_addr).start()
    ps.wait_address()
    mt.wait_address()
    agent = plane.agent([replication("p1", "d0", ps_addr, mt_addr)], {"d0": src})
    assignments = plane.root / "agent-assignments.json"
    desired = json.loads(assignments.read_text())
    assignments.write_text(json.dumps({**desired, "crash_interval_seconds": 0}))
    agent.start()
    wait_replicated(agent, mt, "p1")
    stats = pair_stats(agent, "p1")
    assert stats["captured_seq"] == stats["acked_seq"], stats
    agent.kill(signal.SIGTERM)  # a graceful stop: drain, then the last report
    stats = pair_stats(agent, "p1")
    assert stats["state"] == "protected" and stats["captured_seq"] == stats["acked_seq"], stats
