"""A master target process that applies a stream, syncs, applies more and is killed with SIGKILL.

`python -m tests.journal.crash_child <dir> <mode>`; exits 3 if the crash state it was asked to
reach was not reached (so the test cannot pass vacuously). `build` is shared with the test, which
regenerates the identical stream to check what the reopened journal holds; `resident_bytes` too.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from siterecovery.dataplane.journal import JournaledDisk
from tests.journal.workload import Feeder, Guest

SIZE = 16 << 20
CLOCK = 1_700_000_000.0


def build(mode: str) -> tuple[Guest, int]:
    """The guest's stream and the sequence number synced before the crash."""
    guest = Guest(SIZE, seed=11)
    for _ in range(30):
        guest.append()
    guest.fill_scratch()
    guest.bookmark("app", "before-crash", CLOCK)
    committed = guest.seq
    if mode in ("journal-written-disk-not", "direct-written"):
        guest.fill_scratch()  # 8 MiB of old data to journal: the buffer spills to the file
    else:
        for _ in range(10):
            guest.append()
            if mode == "journal-and-disk-written":
                guest.scratch()  # zero ranges reach the disk at once, after their undo is fsynced
    return guest, committed


def pending_limit(mode: str) -> int:
    return 1 if mode in ("journal-and-disk-written", "direct-written") else 64 << 20


def resident_bytes(path: Path) -> int:
    """Bytes of `path` in the page cache (util-linux `fincore`)."""
    out = subprocess.run(
        ["fincore", "--bytes", "--noheadings", "--output", "RES", str(path)],
        check=True,
        capture_output=True,
        text=True,
    )
    return int(out.stdout.strip())


def rollback_guest() -> Guest:
    """The stream of the interrupted-rollback case: the crash case's, then many small overwrites."""
    guest, _ = build("journal-buffered")
    for _ in range(3):
        guest.fill_scratch(64 << 10)
    return guest


def rollback(directory: Path) -> int:
    """Roll the disk back in tiny batches (one fsync each) and wait to be killed half-way."""
    guest = rollback_guest()
    disk = JournaledDisk(
        directory / "disk.img",
        directory / "disk-journal",
        3600.0,
        name="disk",
        size=SIZE,
        clock=lambda: CLOCK,
        pending_limit=1,
    )
    Feeder(disk, guest).feed()
    disk.sync()
    (point,) = (p for p in disk.points() if p.tag == "before-crash")
    print("rolling back", flush=True)
    disk.rollback_to(point)
    print("done", flush=True)
    return 0


def main(directory: Path, mode: str) -> int:
    if mode == "rollback":
        return rollback(directory)
    guest, committed = build(mode)
    disk = JournaledDisk(
        directory / "disk.img",
        directory / "disk-journal",
        3600.0,
        name="disk",
        size=SIZE,
        clock=lambda: CLOCK,
        pending_limit=pending_limit(mode),
    )
    feeder = Feeder(disk, guest)
    while feeder.next < committed:
        feeder.feed(1)
    disk.sync()
    segment = max((directory / "disk-journal").glob("seg-*.jnl"))
    synced_size = segment.stat().st_size
    synced_image = (directory / "disk.img").read_bytes()
    feeder.feed()
    # The 1 MiB runs of "direct-written" went past the page cache (`direct_write.py`): the pages
    # read above were dropped, not replaced.
    direct = resident_bytes(directory / "disk.img") <= SIZE // 2
    grew = segment.stat().st_size > synced_size
    disk_changed = (directory / "disk.img").read_bytes() != synced_image
    reached = {
        "journal-buffered": not grew and not disk_changed,
        "journal-written-disk-not": grew and not disk_changed,
        "journal-and-disk-written": grew and disk_changed,
        "direct-written": grew and disk_changed and direct,
    }[mode]
    if not reached:
        state = f"grew={grew} disk_changed={disk_changed} direct={direct}"
        print(f"crash state not reached: {state}", file=sys.stderr)
        return 3
    os.kill(os.getpid(), signal.SIGKILL)
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]), sys.argv[2]))
