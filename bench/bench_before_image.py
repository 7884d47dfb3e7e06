"""Before-image log benchmark: a lab snapshot's first pass over a disk, against the same export without one.

A lab disk with a snapshot is served by the NBD export with its before-image log: the first write to
each 64 KiB chunk copies the chunk's old contents into the log, durably, before the overwrite
(`dataplane/before_image.py`). This bench fills a raw image with random data and runs one pass of
`fio --ioengine=nbd` (1 MiB sequential and 4 KiB random writes, queue depth 32, every block written
once) against the export with a fresh snapshot log (the first pass: every chunk is saved) and
against the same export with no snapshot, alternating in a rotating order, medians kept. Prints MiB/s
and IOPS with the ratio and writes them to `bench/results/before-image.md` with the machine and its
load. Run with `python -m bench.bench_before_image [--size-mib N] [--rounds N]`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.bench_capture import JOBS, Job, Result, machine, median
from siterecovery.dataplane import before_image
from siterecovery.dataplane.nbd.image import Export
from siterecovery.dataplane.nbd.server import run_nbd_server_in_thread

MiB = 1 << 20
RESULTS = Path(__file__).resolve().parent / "results" / "before-image.md"


def one_pass(sock: Path, job: Job, size: int) -> Result:
    """fio writing every block of the disk once (no time limit, random map on)."""
    out = subprocess.run(
        [
            "fio",
            "--name=first-pass",
            "--ioengine=nbd",
            f"--uri=nbd+unix:///disk?socket={sock}",
            f"--rw={job.rw}",
            f"--bs={job.bs}",
            "--iodepth=32",
            f"--size={size}",
            "--output-format=json",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    write = json.loads(out[out.index("{") :])["jobs"][0]["write"]
    return Result(write["bw_bytes"] / MiB, write["iops"])


def serve_once(image: Path, sock: Path, job: Job, size: int, snapshot: bool) -> tuple[Result, int]:
    """One pass against a fresh export of `image`; with `snapshot` a new before-image log first."""
    log = before_image.log_path(image)
    if snapshot:
        before_image.create(image)
    server = run_nbd_server_in_thread([Export.for_image("disk", image)], unix=sock)
    try:
        result = one_pass(sock, job, size)
    finally:
        server.stop()
    saved = log.stat().st_size if snapshot else 0
    if snapshot:
        before_image.discard(image)
    return result, saved


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=512, help="disk size; each pass writes all of it")
    parser.add_argument("--rounds", type=int, default=3, help="alternating runs per job; medians are kept")
    args = parser.parse_args()
    size = args.size_mib * MiB
    loads = [os.getloadavg()[0]]
    rows: list[tuple[Job, Result, Result, int]] = []
    with tempfile.TemporaryDirectory(prefix="bench-before-image-", dir=os.environ.get("BENCH_TMP")) as tmp:
        image, sock = Path(tmp) / "disk.img", Path(tmp) / "disk.sock"
        with open(image, "wb") as f:
            for _ in range(args.size_mib):
                f.write(os.urandom(MiB))
        for job in JOBS:
            runs: dict[bool, list[Result]] = {False: [], True: []}
            saved = 0
            for r in range(args.rounds):
                for snapshot in (False, True) if r % 2 == 0 else (True, False):
                    result, got = serve_once(image, sock, job, size, snapshot)
                    runs[snapshot].append(result)
                    saved = max(saved, got)
            rows.append((job, median(runs[False]), median(runs[True]), saved))
    loads.append(os.getloadavg()[0])
    table = [
        "| fio job (one pass over the disk) | no snapshot MiB/s | snapshot, first pass MiB/s | ratio "
        "| no snapshot IOPS | snapshot, first pass IOPS | log size MiB |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for job, plain, snap, saved in rows:
        table.append(
            f"| {job.name} | {plain.mib_s:.0f} | {snap.mib_s:.0f} | {snap.mib_s / plain.mib_s:.2f}x "
            f"| {plain.iops:.0f} | {snap.iops:.0f} | {saved / MiB:.0f} |"
        )
    report = "\n".join(
        [
            "# Before-image log: a lab snapshot's first pass over a disk",
            "",
            f"`fio --ioengine=nbd`, iodepth 32, one pass over a {args.size_mib} MiB raw image of random "
            f"data (every block written once), Unix socket; median of {args.rounds} runs per server, "
            "alternating. *Snapshot* = a fresh before-image log, so every 64 KiB chunk is saved before "
            "its first overwrite; the queued requests of a connection are saved under one fdatasync.",
            "",
            *table,
            "",
            f"Load average (1 min) at the start and the end: {loads[0]:.1f}, {loads[1]:.1f} on "
            f"{os.cpu_count()} cores (the machine is shared: compare the columns of one run).",
            "",
            "Machine:",
            "",
            machine(),
            "",
        ]
    )
    print(report)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
