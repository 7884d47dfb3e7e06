"""The pair's sender runs in a child process of the agent (`sender_process.py`), supervised.

The writer is not our code: `qemu-io` processes, one after another, each writing a batch of 512
4 KiB records through the agent's export (`aio_write`, a known byte pattern per slot), flushing
(`aio_flush`, then an NBD `flush`) every 64 records and at the end. A batch counts as flushed once
its `qemu-io` exited 0 without a failed request, which it does only after the export answered its
last FLUSH. (It replaces the tests' own stdlib NBD writer, `tests/nbd_writer.py`, here.)
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
from pathlib import Path

from tests.conftest import require_tool
from tests.dataplane.conftest import Plane, compare_raw, make_image, one_pair, wait_for, wait_replicated

from siterecovery.dataplane.sender_process import PID_FILE

MiB = 1 << 20
SIZE = 32 * MiB
BASE = 4 * MiB  # the records' region: slots of 4 KiB from here
SLOTS = 2048
RECORD = 4096
BATCH = 512  # records per qemu-io process
FLUSH_EVERY = 64  # records between its flushes


def _pattern(slot: int) -> int:
    """Each slot's byte: never 0 (the region starts as zeroes), never the same as its neighbours'."""
    return slot % 251 + 1


class QemuIoWriter:
    """Batches of records written and flushed by `qemu-io` over NBD, on a thread, until all slots
    are written. The last batch waits for `release()`, so writes still go on after the last kill
    however fast the rest went."""

    def __init__(self, sock: Path, slots: int) -> None:
        self._args = [require_tool("qemu-io"), "-f", "raw", f"nbd+unix:///d0?socket={sock}"]
        self.slots = slots
        self.flushed = 0  # records [0, flushed) were written and flushed
        self.error: str | None = None
        self._changed = threading.Condition()
        self._released = threading.Event()
        self._thread = threading.Thread(target=self._run, name="qemu-io-writer", daemon=True)

    def start(self) -> QemuIoWriter:
        self._thread.start()
        return self

    def release(self) -> None:
        self._released.set()

    def wait_flushed(self, count: int, timeout: float = 120.0) -> None:
        with self._changed:
            if not self._changed.wait_for(lambda: self.flushed >= count or self.error is not None, timeout):
                raise AssertionError(f"the writer flushed {self.flushed} of {count} records")
        assert self.error is None, self.error

    def join(self) -> None:
        self._thread.join(timeout=300)
        assert not self._thread.is_alive(), "the writer did not finish"
        assert self.error is None, self.error

    def _run(self) -> None:
        for first in range(0, self.slots, BATCH):
            last = min(first + BATCH, self.slots)
            if last == self.slots and not self._released.wait(300):
                self._fail("never released")
                return
            cmds: list[str] = []
            for slot in range(first, last):
                cmds += ["-c", f"aio_write -q -P {_pattern(slot)} {BASE + slot * RECORD} {RECORD}"]
                if (slot + 1) % FLUSH_EVERY == 0 or slot + 1 == last:
                    cmds += ["-c", "aio_flush", "-c", "flush"]
            done = subprocess.run([*self._args, *cmds], capture_output=True, text=True, timeout=120)
            said = (done.stdout + done.stderr).lower()  # -q: nothing unless a request failed
            if done.returncode != 0 or "error" in said or "failed" in said:
                self._fail(
                    f"qemu-io failed on records {first}-{last}: {done.stdout[-500:]}{done.stderr[-500:]}"
                )
                return
            with self._changed:
                self.flushed = last
                self._changed.notify_all()

    def _fail(self, why: str) -> None:
        with self._changed:
            self.error = why
            self._changed.notify_all()


def _bad_records(image: Path, flushed: int) -> list[int]:
    """Slots below `flushed` that do not hold their own record whole."""
    bad = []
    with open(image, "rb") as f:
        for slot in range(flushed):
            f.seek(BASE + slot * RECORD)
            if f.read(RECORD) != bytes([_pattern(slot)]) * RECORD:
                bad.append(slot)
    return bad


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
    """kill -9 of the sender child, twice, while qemu-io goes on writing and flushing: the agent
    restarts it, the export never fails a request, every flushed record reaches the replica whole
    and the replica equals the source. Then kill -9 of the agent: its sender child exits by itself."""
    src = make_image(plane.root / "src.img", SIZE, [(0, 1 * MiB, 0x42)])
    target = plane.root / "target.img"
    mt, _, agent = one_pair(plane, src, target, SIZE)
    wait_replicated(agent, mt, "p1")
    pid_file = agent.state_dir / "pairs" / "p1" / PID_FILE
    child = _child(pid_file)
    writer = QemuIoWriter(plane.root / "nbd" / "d0.sock", SLOTS).start()
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
    bad = _bad_records(target, writer.flushed)
    assert not bad, (
        f"{len(bad)} of {writer.flushed} flushed records missing or torn on the replica, first {bad[:8]}"
    )
    assert _bad_records(src, writer.flushed) == [], "the source lacks records qemu-io flushed"
    assert compare_raw(src, target) == 0
    agent.kill(signal.SIGKILL)
    wait_for(lambda: not _alive(child), 60, "the sender child to exit with its agent")
