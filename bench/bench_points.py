"""Recovery-point benchmark: materialising "latest" vs a point 1 GiB of writes ago, and apply speed.

On a 10 GiB sparse target disk with a retention journal (`JournaledDisk`): write 1 GiB of base
data, take a point, then apply 1 GiB of 1 MiB writes over it (syncing every 64 MiB, as the master
target acknowledges batches) and a burst of 4 KiB random writes. Then time materialising the latest
point in place (DESIGN.md: time independent of disk size), rolling back in place to the point
taken 1 GiB of writes ago and forward again, and materialising both points as sparse copies. With
`--full-copy`, a plain full copy of the disk is timed as the peer. `SITERECOVERY_BENCH_SCALE`
(default 1.0) scales the disk and write volumes for quick runs. Writes `bench/results/points.md`.
Run with `python -m bench.bench_points [--full-copy]`.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from siterecovery.dataplane.journal import JournaledDisk
from siterecovery.dataplane.points import CrashPointPolicy

T = TypeVar("T")

GIB = 1 << 30
MIB = 1 << 20
RESULTS = Path(__file__).resolve().parent / "results" / "points.md"


@dataclass(frozen=True)
class Row:
    what: str
    seconds: float
    data_bytes: int
    note: str = ""

    def line(self) -> str:
        rate = f"{self.data_bytes / MIB / self.seconds:.0f}" if self.seconds > 0 and self.data_bytes else "-"
        return f"| {self.what} | {self.data_bytes / MIB:.0f} | {self.seconds:.3f} | {rate} | {self.note} |"


def _timed(fn: Callable[[], T]) -> tuple[float, T]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def run(scale: float, full_copy: bool, workdir: Path) -> list[Row]:
    disk_size = int(10 * GIB * scale) // MIB * MIB
    churn = int(1 * GIB * scale) // MIB * MIB
    rng = random.Random(1)
    buf = memoryview(rng.randbytes(4 * MIB))
    disk = JournaledDisk(
        workdir / "disk.img",
        workdir / "journal",
        24 * 3600.0,
        name="disk",
        size=disk_size,
        crash_points=CrashPointPolicy(5.0),
    )
    rows: list[Row] = []
    seq = 0
    try:
        for off in range(0, churn, 4 * MIB):  # base data the churn overwrites
            seq += 1
            disk.apply_write(seq, off, buf)
        disk.sync()
        point = disk.take_crash_point()

        def churn_1m() -> None:
            nonlocal seq
            region = 2 * churn // MIB
            for k in range(churn // MIB):
                seq += 1
                off = rng.randrange(region) * MIB
                disk.apply_write(seq, off, buf[(k % 4) * MIB : (k % 4 + 1) * MIB])
                if k % 64 == 63:
                    disk.sync()
            disk.sync()

        t, _ = _timed(churn_1m)
        rows.append(Row("apply 1 MiB writes (journal + disk, sync every 64 MiB)", t, churn))

        small = max(churn // 16, 4 * MIB)

        def churn_4k() -> None:
            nonlocal seq
            blocks = 2 * churn // 4096
            for k in range(small // 4096):
                seq += 1
                disk.apply_write(
                    seq, rng.randrange(blocks) * 4096, buf[(k % 1024) * 4096 : (k % 1024 + 1) * 4096]
                )
                if k % 4096 == 4095:
                    disk.sync()
            disk.sync()

        t, _ = _timed(churn_4k)
        rows.append(Row("apply 4 KiB random writes", t, small, f"{small // 4096 / t:.0f} writes/s"))
        journal = disk.journal_bytes

        t, res = _timed(lambda: disk.materialise_in_place(disk.latest_point()))
        rows.append(Row("materialise latest in place", t, 0, f"bytes moved: {res.bytes_moved}"))
        t, res = _timed(lambda: disk.rollback_to(point))
        rows.append(
            Row(
                f"roll back in place to the point {churn // MIB} MiB of writes ago",
                t,
                res.bytes_moved,
                f"{res.records} undo records",
            )
        )
        t, res = _timed(lambda: disk.roll_forward_to(disk.latest_point()))
        rows.append(
            Row(
                "roll forward in place to latest (redo)",
                t,
                res.bytes_moved,
                f"{res.records} redo records",
            )
        )
        copy = workdir / "copy.img"
        t, res = _timed(lambda: disk.materialise_copy(disk.latest_point(), copy))
        rows.append(
            Row(
                "materialise latest as a sparse copy",
                t,
                res.bytes_moved,
                f"method {res.method.value}",
            )
        )
        copy.unlink()
        t, res = _timed(lambda: disk.materialise_copy(point, copy))
        rows.append(
            Row(
                "materialise the older point as a sparse copy",
                t,
                res.bytes_moved,
                f"{res.bytes_copied // MIB} MiB copied + {res.bytes_rewritten // MIB} MiB undone",
            )
        )
        copy.unlink()
        if full_copy:
            t, _ = _timed(
                lambda: subprocess.run(
                    ["dd", f"if={workdir / 'disk.img'}", f"of={copy}", "bs=4M", "conv=fsync", "status=none"],
                    check=True,
                )
            )
            rows.append(Row("peer: full copy of the disk (dd, 4 MiB blocks)", t, disk_size))
            copy.unlink()
        rows.append(Row("journal on the retention volume", 0.0, journal, "after the writes above"))
    finally:
        disk.close()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--full-copy", action="store_true", help="also time a full copy of the disk")
    args = parser.parse_args()
    scale = float(os.environ.get("SITERECOVERY_BENCH_SCALE", "1.0"))
    base = Path(os.environ.get("SITERECOVERY_BENCH_DIR", tempfile.gettempdir()))
    workdir = Path(tempfile.mkdtemp(prefix="bench-points-", dir=base))
    try:
        rows = run(scale, args.full_copy, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    cpu = next(
        (
            ln.split(":", 1)[1].strip()
            for ln in Path("/proc/cpuinfo").read_text().splitlines()
            if ln.startswith("model name")
        ),
        platform.processor(),
    )
    text = "\n".join(
        [
            "# Recovery points: materialise latest vs an older point; journal apply throughput",
            "",
            f"Target disk {10 * scale:.2f} GiB sparse (scale {scale}); {scale:.2f} GiB of base data, then "
            f"{scale:.2f} GiB of 1 MiB writes after the older point. Target (DESIGN.md): failover to latest "
            "costs time independent of disk size; an older point costs O(bytes written since).",
            "",
            "| operation | MiB moved | seconds | MiB/s | note |",
            "|---|---:|---:|---:|---|",
            *(r.line() for r in rows),
            "",
            "Machine:",
            "",
            f"- `{' '.join(platform.uname())}`",
            f"- CPU: {cpu}, {os.cpu_count()} cores",
            f"- Python {platform.python_version()}",
            "",
        ]
    )
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
