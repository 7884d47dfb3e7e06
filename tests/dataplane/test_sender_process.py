"""The pair's sender runs in a child process of the agent (`sender_process.py`), supervised.

The writer is not our code: `qemu-io` processes, one after another, each writing a batch of 512
4 KiB records through the agent's export (`aio_write`, a known byte pattern per slot), flushing
(`aio_flush`, then an NBD `flush`) every 64 records and at the end. A batch counts as flushed once
its `qemu-io` exited 0 without a failed request, which it does only after the export answered its
last FLUSH (`tests/qemu_io_writer.py`).
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

from tests.dataplane.conftest import (
    Plane,
    compare_raw,
    free_addresses,
    make_image,
    one_pair,
    relay,
    replication,
    wait_for,
    wait_replicated,
    write_json,
)
from tests.qemu_io_writer import QemuIoWriter, Records, bad_records

from siterecovery.dataplane.sender_process import PID_FILE

MiB = 1 << 20
SIZE = 32 * MiB
BASE = 4 * MiB  # the records' region: slots of 4 KiB from here
SLOTS = 2048
BATCH = 512  # records per qemu-io process


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _children(pid: int) -> list[int]:
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            out += [int(c) for c in (task / "children").read_text().split()]
        except FileNotFoundError:
            continue
    return out


def _child(pid_file: Path, other_than: int = -1) -> int:
    """The running sender child's pid, once it is another than `other_than`."""

    def started() -> bool:
        try:
            pid = int(pid_file.read_text())
        except (FileNotFoundError, ValueError):
            return False
        return pid != other_than and _alive(pid)

    wait_for(started, 60, "a sender child")
    return int(pid_file.read_text())


def test_sender_child_kill_9_under_writer_loses_no_flushed_record(plane: Plane) -> None:
    """kill -9 of the sender child, twice, while qemu-io goes on writing and flushing: the agent
    restarts it, the export never fails a request, every flushed record reaches the replica whole
    and the replica equals the source. Then kill -9 of the agent: its sender child exits by itself."""
    src = make_image(plane.root / "src.img", SIZE, [(0, 1 * MiB, 0x42)])
    target = plane.root / "target.img"
    mt, _, agent = one_pair(plane, src, target, SIZE)
    wait_replicated(agent, mt, "p1")
    pid_file = agent.state_dir / "pairs" / "p1" / PID_FILE
    child = _child(pid_file)
    writer = QemuIoWriter(
        plane.root / "nbd" / "d0.sock",
        SLOTS,
        base=BASE,
        kind=Records.PATTERN,
        workdir=plane.root / "records",
        batch=BATCH,
        flush_every=64,
        hold_last=True,
    ).start()
    try:
        for at in (BATCH, 2 * BATCH):  # each while a batch is in flight or about to start
            writer.wait_flushed(at)
            os.kill(child, signal.SIGKILL)
            child = _child(pid_file, other_than=child)
    finally:
        writer.release()
    writer.join()  # every slot written and flushed; qemu-io never saw a failed request
    assert agent.proc is not None and agent.proc.poll() is None
    wait_replicated(agent, mt, "p1", timeout=120)
    bad = bad_records(target, BASE, writer.flushed, Records.PATTERN)
    assert not bad, (
        f"{len(bad)} of {writer.flushed} flushed records missing or torn on the replica, first {bad[:8]}"
    )
    assert bad_records(src, BASE, writer.flushed, Records.PATTERN) == [], (
        "the source lacks records qemu-io flushed"
    )
    assert compare_raw(src, target) == 0
    agent.kill(signal.SIGKILL)
    wait_for(lambda: not _alive(child), 60, "the sender child to exit with its agent")


def test_an_agent_starts_a_spare_sender_child_and_its_first_pair_takes_it(plane: Plane) -> None:
    """An agent with no pair yet has one sender child started ahead (its imports paid before a pair
    needs it); the first pair enabled runs in that very process, replicates, and no other child
    is started for it. The spare exits with its agent."""
    src = make_image(plane.root / "src.img", 4 * MiB, [(0, 1 * MiB, 0x42)])
    target = plane.root / "target.img"
    ps_addr, mt_addr = free_addresses(2)
    mt = plane.master_target(
        [{"pair_id": "p1", "path": str(target), "size": 4 * MiB}], listen=mt_addr
    ).start()
    ps = plane.process_server(listen=ps_addr).start()
    ps.wait_address()
    mt.wait_address()
    agent = plane.agent([], {"d0": src}).start()
    assert agent.proc is not None
    pid = agent.proc.pid
    wait_for(lambda: len(_children(pid)) == 1, 120, "the agent's spare sender child")
    (spare,) = _children(pid)
    plane.assign_relays("ps", [relay("p1", "agent", mt_addr, "mt", 4 * MiB)])
    write_json(
        plane.root / "agent-assignments.json", {"replications": [replication("p1", "d0", ps_addr, mt_addr)]}
    )
    wait_replicated(agent, mt, "p1")
    assert _child(agent.state_dir / "pairs" / "p1" / PID_FILE) == spare
    assert _children(pid) == [spare]
    assert compare_raw(src, target) == 0
    agent.kill(signal.SIGKILL)
    wait_for(lambda: not _alive(spare), 60, "the sender child to exit with its agent")
