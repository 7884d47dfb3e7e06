"""The pair's sender runs in a child process of the agent (`sender_process.py`), supervised.

The writer is `tests.nbd_writer` (a stdlib NBD client, not the project's code) writing
self-verifying records with a FLUSH every 16 through the agent's export.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

from tests.dataplane.conftest import Plane, compare_raw, make_image, one_pair, wait_for, wait_replicated
from tests.nbd_writer import RecordWriter, verify_records

from siterecovery.dataplane.sender_process import PID_FILE

MiB = 1 << 20
SIZE = 32 * MiB
BASE = 4 * MiB  # the records' region: slots of 4 KiB from here


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


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
    """kill -9 of the sender child, twice, while the writer goes on: the agent restarts it, the
    export never drops the writer, every flushed record reaches the replica and the replica equals
    the source. Then kill -9 of the agent: its sender child exits by itself."""
    src = make_image(plane.root / "src.img", SIZE, [(0, 1 * MiB, 0x42)])
    target = plane.root / "target.img"
    mt, _, agent = one_pair(plane, src, target, SIZE)
    wait_replicated(agent, mt, "p1")
    pid_file = agent.state_dir / "pairs" / "p1" / PID_FILE
    child = _child(pid_file)
    slots = (SIZE - BASE) // 4096
    writer = RecordWriter(plane.root / "nbd" / "d0.sock", "d0", BASE, slots=slots).start()
    try:
        for at in (256, 2048):
            writer.wait_flushed(at)
            os.kill(child, signal.SIGKILL)
            child = _child(pid_file, other_than=child)
        writer.wait_flushed(slots)  # every slot, then a last FLUSH
    finally:
        writer.stop()
    assert writer.error is None, writer.error
    assert writer.reconnects == 0, "the export went down with the sender"
    assert agent.proc is not None and agent.proc.poll() is None
    flushed = writer.flushed
    wait_replicated(agent, mt, "p1", timeout=120)
    verdict = verify_records(target, BASE, flushed, seed=1)
    assert verdict.first_bad is None, (
        f"replica holds {verdict.valid} of {flushed} flushed records; slot {verdict.first_bad} is "
        f"{verdict.why}"
    )
    assert compare_raw(src, target) == 0
    agent.kill(signal.SIGKILL)
    wait_for(lambda: not _alive(child), 60, "the sender child to exit with its agent")
