"""A damaged frame header in a segment log (the process server's cache, the agent's spool) loses
nothing acknowledged, loudly: the intact frames after it are kept, the whole pair is compared with
the replica (delta resync), and the loss is reported (a `frame-refused` alert) until repaired.

The writer is not our code: one `qemu-io` (`tests/qemu_io_writer.py`) writing self-verifying
records, one request at a time, with a FLUSH every 16; it counts them flushed once it exited 0
without a failed request. Every flushed record must reach the replica whole. (The records are
random, so a frame stores them as written and a test finds the frame of one by its payload.)
"""

from __future__ import annotations

import signal
from pathlib import Path

from tests.dataplane.conftest import (
    Component,
    OnePair,
    Plane,
    compare_raw,
    make_image,
    one_pair,
    pair_stats,
    wait_for,
    wait_replicated,
)
from tests.qemu_io_writer import QemuIoWriter, Records, bad_records, record, record_file, run

from siterecovery.dataplane.protocol import HEADER_SIZE

MiB = 1 << 20
SIZE = 16 * MiB
BASE = 4 * MiB
RECORDS = 96
DAMAGED = 48  # the record whose frame header is damaged: frames after it must survive


def _damage_header(directory: Path, slot: int) -> None:
    """Flip a byte in the header of the frame carrying record `slot` (stored as written), in place
    (a running process server keeps reading the same file)."""
    needle = record(slot, seed=1)
    for segment in sorted(directory.glob("*.seg")):
        raw = segment.read_bytes()
        at = raw.find(needle)
        if at >= 0:
            with open(segment, "r+b") as f:
                f.seek(at - HEADER_SIZE + 20)
                f.write(bytes([raw[at - HEADER_SIZE + 20] ^ 0xFF]))
            return
    raise AssertionError(f"{directory} does not hold record {slot}")


def _seq(agent: Component, key: str) -> int:
    return int(pair_stats(agent, "p1").get(key, -1))  # type: ignore[call-overload]


def _write_records(plane: Plane, agent: Component) -> None:
    before = _seq(agent, "captured_seq")
    writer = QemuIoWriter(
        plane.root / "nbd" / "d0.sock",
        RECORDS,
        base=BASE,
        kind=Records.UNIQUE,
        workdir=plane.root / "records",
        batch=RECORDS,
        flush_every=16,
    ).start()
    writer.join()  # written and flushed, no request failed
    assert writer.flushed == RECORDS, writer.flushed
    # Reported captured (so a report of before the writes cannot pass for one after them).
    wait_for(lambda: _seq(agent, "captured_seq") >= before + RECORDS, 60, "the records to be captured")


def _lost_frames_healed(ps: Component, hop: str) -> bool:
    entries = [e for e in ps.stats().get("refused_frames", []) if e["resync"]]  # type: ignore[union-attr, index]
    assert all(e["hop"] == hop for e in entries), entries  # type: ignore[index]
    return bool(entries) and all(e["healed"] for e in entries)  # type: ignore[index]


def _wait_records(target: Path) -> None:
    """Until every flushed record is on the replica (the master target keeps applying meanwhile)."""
    last: list[list[int]] = []

    def complete() -> bool:
        if not target.exists():
            return False
        last[:] = [bad_records(target, BASE, RECORDS, Records.UNIQUE)]
        return not last[0]

    try:
        wait_for(complete, 120, "every flushed record on the replica")
    except AssertionError:
        where = f"slots {last[0][:8]} missing or torn" if last else "no replica"
        raise AssertionError(f"flushed records lost: {where} (of {RECORDS})") from None


def _records_in_the_cache(plane: Plane, src: Path, target: Path) -> OnePair:
    """The pair with the master target down: the sync and the records stop in the process server's
    cache; returns once the process server acknowledged them all."""
    make_image(src, SIZE, [(0, 1 * MiB, 0x42)])
    hops = one_pair(plane, src, target, SIZE, master_target_up=False)
    agent = hops.agent
    wait_for(lambda: pair_stats(agent, "p1").get("state") == "protected", 60, "the sync to be cached")
    _write_records(plane, agent)

    def acked_by_ps() -> bool:
        spooled = pair_stats(agent, "p1")["spool_bytes"]
        return _seq(agent, "acked_seq") >= _seq(agent, "captured_seq") and spooled == 0

    wait_for(acked_by_ps, 60, "the records to be acknowledged by the process server")
    return hops


def test_damaged_header_in_the_process_server_cache_loses_nothing(plane: Plane) -> None:
    src, target = plane.root / "src.img", plane.root / "target.img"
    mt, ps, agent = _records_in_the_cache(plane, src, target)
    ps.kill(signal.SIGKILL)
    _damage_header(ps.state_dir / "cache" / "p1", DAMAGED)

    ps.start()
    mt.start()
    # Used to cut the cache at the bad header: the records after it never reached the replica.
    _wait_records(target)
    wait_for(lambda: _lost_frames_healed(ps, "process-server cache"), 120, "the loss to be reported, healed")
    wait_replicated(agent, mt, "p1", timeout=120)
    assert compare_raw(src, target) == 0
    pairs = mt.stats().get("pairs", [])
    assert all(not p["missing"] for p in pairs)  # type: ignore[index, union-attr]


def test_damaged_header_met_by_a_running_process_server_loses_nothing(plane: Plane) -> None:
    """No restart: the forwarder meets the bad header itself (it used to retry it for ever)."""
    src, target = plane.root / "src.img", plane.root / "target.img"
    mt, ps, agent = _records_in_the_cache(plane, src, target)
    _damage_header(ps.state_dir / "cache" / "p1", DAMAGED)
    mt.start()
    _wait_records(target)
    wait_for(lambda: _lost_frames_healed(ps, "process-server cache"), 120, "the loss to be reported, healed")
    wait_replicated(agent, mt, "p1", timeout=120)
    assert compare_raw(src, target) == 0


def test_damaged_header_in_the_agent_spool_loses_nothing(plane: Plane) -> None:
    src = make_image(plane.root / "src.img", SIZE, [(0, 1 * MiB, 0x42)])
    target = plane.root / "target.img"
    mt, ps, agent = one_pair(plane, src, target, SIZE)
    wait_replicated(agent, mt, "p1")
    ps.kill(signal.SIGKILL)  # the records stay in the agent's spool
    _write_records(plane, agent)
    # A flushed write in another 4 MiB extent: the write-intent log unmarks the records' extent
    # (their capture is durable), so only the spool holds them when the agent is killed.
    other = record_file(plane.root / "records", 0, seed=2)
    done = run(plane.root / "nbd" / "d0.sock", [f"write -q -s {other} {SIZE - MiB} 4096", "flush"])
    assert done.returncode == 0 and not done.stdout + done.stderr, done.stdout + done.stderr
    agent.kill(signal.SIGKILL)
    _damage_header(agent.state_dir / "pairs" / "p1" / "spool", DAMAGED)
    (agent.state_dir / "stats.json").unlink(missing_ok=True)  # no stale report after the restart

    agent.start()
    ps.start()
    # Used to cut the spool at the bad header: the records after it were never sent.
    _wait_records(target)
    wait_for(lambda: _lost_frames_healed(ps, "agent spool"), 120, "the loss to be reported, then healed")
    wait_replicated(agent, mt, "p1", timeout=120)
    assert compare_raw(src, target) == 0
    pairs = mt.stats().get("pairs", [])
    assert all(not p["missing"] for p in pairs)  # type: ignore[index, union-attr]
