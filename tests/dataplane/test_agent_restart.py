"""Agent restarts under a live writer: capture is never off while the disk accepts writes.

The writer is not our code: `qemu-io` (`tests/qemu_io_writer.py`), batches of self-verifying
records, one `qemu-io` process each, with a FLUSH every 16 records. The agent is killed while a
batch is in flight (held mid-way, its connection open, some of its records answered but not yet
flushed): that batch fails (its connection dies with the agent) and is not counted flushed; it is
written again, whole, by a new `qemu-io` once the restarted export accepts. The crash between image
and spool is one `qemu-io` too, one request at a time, whose sixth write the agent exits under.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
from tests.dataplane.conftest import (
    Component,
    Plane,
    compare_raw,
    free_addresses,
    make_image,
    one_pair,
    pair_stats,
    wait_for,
    wait_replicated,
)
from tests.qemu_io_writer import (
    RECORD,
    QemuIoWriter,
    Records,
    bad_records,
    connects,
    record,
    record_file,
    run,
)

from siterecovery.dataplane.agent import FAULT_EXIT_BEFORE_CAPTURE, FAULT_EXIT_CODE

MiB = 1 << 20
SIZE = 16 * MiB
BASE = 4 * MiB  # the records' region: slots of 4 KiB from here


def _restarted_unregistered(plane: Plane, agent: Component, disk: Path) -> Component:
    """The same agent started the way the lab powers a machine on: with a configuration server
    (unreachable here: an outage) and the AG-1 registration delay (an hour: it never registers)."""
    [dead] = free_addresses(1)
    passphrase = plane.root / "passphrase"
    passphrase.write_text("not-used\n")
    args = [
        "agent",
        "--machine",
        "agent",
        "--state-dir",
        str(agent.state_dir),
        "--server",
        f"http://{dead}",
        "--passphrase-file",
        str(passphrase),
        "--registration-delay",
        "3600",
        "--nbd-unix-dir",
        str(plane.root / "nbd"),
        "--interval",
        "0.3",
        "--disk",
        f"d0={disk}",
    ]
    comp = Component(args, agent.state_dir, plane.root / "agent-restarted.log")
    plane.components.append(comp)
    return comp.start()


def test_agent_kill_9_restart_under_writer_loses_no_flushed_record(plane: Plane) -> None:
    """Issue 12: writes between a restarted agent's export and its registration were never captured.

    The agent is killed with kill -9 under the writer and restarted unregistered (AG-1 delay,
    configuration server away); the writer goes on through the restarted export. Then the agent
    is restarted once more, as when registration finally happens. Every flushed record must be on
    the replica and the replica must equal the source.
    """
    src = make_image(plane.root / "src.img", SIZE, [(0, 1 * MiB, 0x42)])
    target = plane.root / "target.img"
    mt, _, agent = one_pair(plane, src, target, SIZE)
    wait_replicated(agent, mt, "p1")
    sock = plane.root / "nbd" / "d0.sock"
    writer = QemuIoWriter(
        sock,
        (SIZE - BASE) // RECORD,
        base=BASE,
        kind=Records.UNIQUE,
        workdir=plane.root / "records",
        batch=128,
        flush_every=16,
        retry=True,
        pause_at=128 + 24,  # batch 2 paused: 16 records flushed, 8 answered but not flushed yet
    ).start()
    try:
        writer.wait_paused()
        agent.kill(signal.SIGKILL)
        writer.resume()  # batch 2 fails on its dead connection, is written again when the export is back
        restarted = _restarted_unregistered(plane, agent, src)
        writer.wait_flushed(128 + 256)  # written through the restarted export
    finally:
        writer.resume()
        writer.stop()
    writer.join()
    assert writer.failures and "after the pause" in writer.failures[0], writer.failures[:1]
    flushed = writer.flushed
    restarted.kill(signal.SIGKILL)
    # Registration happens at last: the agent runs from its desired state again. (Its statistics
    # of before the first kill must not pass for the new process's.)
    (agent.state_dir / "stats.json").unlink(missing_ok=True)
    agent.start()
    wait_replicated(agent, mt, "p1", timeout=120)
    bad = bad_records(target, BASE, flushed, Records.UNIQUE)
    assert not bad, f"{len(bad)} of {flushed} flushed records missing or torn on the replica, first {bad[:8]}"
    assert bad_records(src, BASE, flushed, Records.UNIQUE) == [], "the source lacks records qemu-io flushed"
    assert compare_raw(src, target) == 0


def test_writes_while_the_pair_is_unknown_are_tracked_and_resynced(plane: Plane) -> None:
    """A disk served while its pair is not plugged in (dropped from the desired state, then listed
    again with the same generation) tracks its writes in a dirty bitmap and resyncs them."""
    src = make_image(plane.root / "src.img", SIZE, [(0, 1 * MiB, 0x42)])
    target = plane.root / "target.img"
    mt, _, agent = one_pair(plane, src, target, SIZE)
    assignments = plane.root / "agent-assignments.json"
    pair = json.loads(assignments.read_text())["replications"][0]  # to list it again below
    wait_replicated(agent, mt, "p1")
    assignments.write_text(json.dumps({"replications": []}))
    wait_for(lambda: pair_stats(agent, "p1") == {} and bool(agent.stats()), 60, "the pair to be dropped")
    writer = QemuIoWriter(
        plane.root / "nbd" / "d0.sock",
        200,
        base=BASE,
        kind=Records.UNIQUE,
        workdir=plane.root / "records",
        batch=200,
        flush_every=16,
    ).start()
    writer.join()  # all 200 slots written and flushed, no request failed
    assert writer.flushed == 200, writer.flushed
    assignments.write_text(json.dumps({"replications": [pair]}))
    wait_replicated(agent, mt, "p1", timeout=120)
    bad = bad_records(target, BASE, 200, Records.UNIQUE)
    assert not bad, f"flushed records missing or torn on the replica: {bad[:8]}"
    assert compare_raw(src, target) == 0


def test_crash_between_image_and_spool_is_resynced_from_the_write_intent_log(
    plane: Plane, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The agent dies after a write reached the image and before it was spooled (a fault hook);
    after the restart, the write-intent log's marked extent is compared with the target and the
    write reaches the replica: the replica equals the source."""
    src = make_image(plane.root / "src.img", SIZE, [(0, 1 * MiB, 0x42)])
    target = plane.root / "target.img"
    mt, _, agent = one_pair(plane, src, target, SIZE)
    wait_replicated(agent, mt, "p1")
    agent.kill(signal.SIGTERM)
    monkeypatch.setenv(FAULT_EXIT_BEFORE_CAPTURE, "5")
    agent.start()
    monkeypatch.delenv(FAULT_EXIT_BEFORE_CAPTURE)
    sock = plane.root / "nbd" / "d0.sock"
    wait_for(lambda: connects(sock), 30, "the restarted export")
    files = plane.root / "records"
    files.mkdir()
    writes = [f"write -q -s {record_file(files, slot)} {BASE + slot * RECORD} {RECORD}" for slot in range(6)]
    # One qemu-io, one request at a time: 5 writes, a FLUSH, then the write the agent exits under.
    done = run(sock, [*writes[:5], "flush", writes[5]])
    said = done.stdout + done.stderr
    assert done.returncode != 0 and said.count("write failed") == 1, said
    assert "flush failed" not in said, said
    assert agent.proc is not None and agent.proc.wait(timeout=60) == FAULT_EXIT_CODE
    with open(src, "rb") as f:
        f.seek(BASE + 5 * RECORD)
        assert f.read(RECORD) == record(5), "the write did not reach the image before the exit"
    (agent.state_dir / "stats.json").unlink(missing_ok=True)
    agent.start()
    wait_replicated(agent, mt, "p1", timeout=120)
    bad = bad_records(target, BASE, 6, Records.UNIQUE)
    assert not bad, f"records missing or torn on the replica: {bad}"
    assert compare_raw(src, target) == 0
