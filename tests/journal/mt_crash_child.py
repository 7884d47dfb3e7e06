"""A master target process killed with SIGKILL in the middle of a sync while its receive thread
holds frames read ahead (`dataplane/mt_inbox.py`).

`python -m tests.journal.mt_crash_child <dir> <mode>` serves pair `p` (a journaled replica at
`<dir>/replica.img`, its journal under `<dir>/retention`) to the process server `ps` whose
certificate the test holds, writes its address to `<dir>/address`, and kills itself in the first
sync after its first `FIRST` writes were committed and acknowledged, once frames are queued
behind it: `written` right after the batch's runs reached the replica (from the receive
thread's pooled buffers, O_DIRECT), `synced` after the replica's fdatasync, before the commit
record. Exits 3 if no frame was queued by then (the case would prove nothing). Mode `direct`
applies without a journal (`DirectApplier`) and is never killed by itself.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

from siterecovery.dataplane import master_target
from siterecovery.dataplane.apply import DiskApplier, direct_applier
from siterecovery.dataplane.assignments import AttachedDisk, MasterTargetDesired
from siterecovery.dataplane.journal import JournaledDisk
from siterecovery.dataplane.links import Identity
from siterecovery.dataplane.mt_inbox import Inbox

SIZE = 32 << 20
PAIR = "p"
FIRST = 8  # the test's first writes, acknowledged before its burst
PENDING_LIMIT = 4 << 20
QUEUE_WAIT = 60.0  # seconds the kill waits for a frame to be queued (generous: CI is loaded)

inboxes: list[Inbox] = []


class _SeenInbox(Inbox):
    """The master target's inbox, remembered so the kill can see what is queued."""

    def __init__(self) -> None:
        super().__init__()
        inboxes.append(self)


def _kill_when_queued() -> None:
    deadline = time.monotonic() + QUEUE_WAIT
    while not any(i.queued for i in inboxes):
        if time.monotonic() > deadline:
            print("no frame was queued behind the sync", flush=True)
            os._exit(3)
        time.sleep(0.01)
    os.kill(os.getpid(), signal.SIGKILL)


class _KilledDisk(JournaledDisk):
    """Dies in the first sync after `FIRST` was committed, at the mode's step (module paragraph)."""

    mode = ""

    def _disk_io(self, fn: Callable[..., None], *args: object) -> None:
        super()._disk_io(fn, *args)
        if self._committed < FIRST:
            return
        if (fn == self._pending.drain and self.mode == "written") or (
            fn is os.fdatasync and self.mode == "synced"
        ):
            _kill_when_queued()


def main(directory: Path, mode: str) -> int:
    _KilledDisk.mode = mode
    retention = directory / "retention"

    def journaled(pair_id: str, path: Path, size: int, state_dir: Path) -> DiskApplier:
        journal = retention / master_target.JOURNAL_DIR / pair_id
        # Pending writes also drain while frames are applied, not only in syncs: a drained pooled
        # buffer goes back to the pool in the middle of applying its frame.
        return _KilledDisk(path, journal, 3600.0, name=pair_id, size=size, pending_limit=PENDING_LIMIT)

    master_target.Inbox = _SeenInbox  # type: ignore[misc]
    mt = master_target.MasterTarget(
        directory / "mt",
        Identity.in_dir(directory / "mt"),
        applier_factory=direct_applier if mode == "direct" else journaled,
    )
    mt.reconcile(
        MasterTargetDesired(
            disks=[AttachedDisk(pair_id=PAIR, path=directory / "replica.img", size=SIZE, process_server="ps")]
        )
    )
    mt.start()
    (directory / "address.tmp").write_text(mt.address)
    os.replace(directory / "address.tmp", directory / "address")
    time.sleep(600)  # killed long before
    return 4


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]), sys.argv[2]))
