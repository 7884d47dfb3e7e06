"""kill -9 of the agent after 1 MiB writes its spool took in batches on its writer thread.

The writer is not our code: `qemu-io` sends 1 MiB writes 32 at a time (`aio_write`), so the export
settles batches of several MiB, which the agent's spool writes on its writer thread with O_DIRECT
(`SegmentLog(direct=True)`, `_Flight`). A first `qemu-io` flushes its writes and exits. A second one
has its writes answered, then sleeps with its connection open and nothing flushed; the agent is
killed with kill -9 as soon as the last write is on the source disk (its batch may still be in
flight), and started again. Every flushed write must be on the replica, and the replica must end
equal to the source: what the spool did not hold yet is covered by the write-intent log and resynced.
"""

from __future__ import annotations

import signal
import subprocess

from tests.dataplane.conftest import Plane, compare_raw, make_image, one_pair, wait_for, wait_replicated
from tests.qemu_io_writer import failed, qemu_io_args, run

MiB = 1 << 20
SIZE = 96 * MiB
WRITES = 32


def _writes(first: int) -> list[str]:
    """`WRITES` 1 MiB writes from slot `first`, each of its own byte, all in flight together."""
    cmds = [f"aio_write -q -P {_byte(slot)} {slot * MiB} {MiB}" for slot in range(first, first + WRITES)]
    return [*cmds, "aio_flush"]  # waits for every answer (no NBD FLUSH)


def _byte(slot: int) -> int:
    return 0x20 + slot


def _holds(path: object, slot: int) -> bool:
    with open(str(path), "rb") as f:
        f.seek(slot * MiB)
        return f.read(MiB) == bytes([_byte(slot)]) * MiB


def test_agent_kill_9_after_batches_on_the_spool_writer_thread(plane: Plane) -> None:
    src = make_image(plane.root / "src.img", SIZE)
    target = plane.root / "target.img"
    mt, _, agent = one_pair(plane, src, target, SIZE)
    wait_replicated(agent, mt, "p1")
    sock = plane.root / "nbd" / "d0.sock"

    done = run(sock, [*_writes(0), "flush"])
    assert done.returncode == 0 and not failed(done.stdout + done.stderr), done.stdout + done.stderr

    # Answered, not flushed: qemu-io sleeps with its connection open (its exit would flush).
    args = [*qemu_io_args(sock)] + [a for c in [*_writes(WRITES), "sleep 120000"] for a in ("-c", c)]
    unflushed = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: _holds(src, 2 * WRITES - 1), 60)
        agent.kill(signal.SIGKILL)
    finally:
        unflushed.kill()
        unflushed.wait()

    (agent.state_dir / "stats.json").unlink(missing_ok=True)  # judge the restarted agent's own
    agent.start()
    wait_replicated(agent, mt, "p1", timeout=120)
    missing = [slot for slot in range(WRITES) if not _holds(target, slot)]
    assert not missing, f"flushed 1 MiB writes missing on the replica: slots {missing}"
    assert all(_holds(src, slot) for slot in range(2 * WRITES)), "the source lacks answered writes"
    assert compare_raw(src, target) == 0
