"""Failover benchmark: planned failover and failback downtime, and the time of each task, by disk size.

The real deployment (`siterecovery.demo.environment.Environment`: lab, configuration server, process
servers and master targets as processes on loopback) runs the demo's whole DR cycle
(`siterecovery.demo.cycle.Cycle`: enable, planned failover, reprotect, failback, change point,
re-protect) on lab machine `web1` with a sparse disk of each size in `--sizes-mib` (default 32 MiB,
1 GiB and 8 GiB; sparse, so cheap to set up). For the planned failover and the failback it prints the
application downtime (the source machine's shutdown to the recovery machine's boot, as the job
records it) and the wall time of each task of the job, and writes the table, with the machine and
its load, to `bench/results/failover.md`. Target (issue 16): downtime independent of disk size.
Run with `python -m bench.bench_failover [--sizes-mib 32,1024,8192]`.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from bench.bench_capture import machine
from siterecovery.demo.cycle import Cycle
from siterecovery.demo.environment import Environment

RESULTS = Path(__file__).resolve().parent / "results" / "failover.md"
MOVES = ("planned failover to cloud", "failback to on-premises")


@dataclass(frozen=True)
class Move:
    size_mib: int
    step: str
    downtime: float | None
    seconds: float  # the whole job
    tasks: list[tuple[str, float]]  # (action, seconds), in order


def measure(size_mib: int, work: Path) -> list[Move]:
    env = Environment(work, disk_size=size_mib << 20)
    try:
        env.start()
        cycle = Cycle(env, "web1")
        cycle.run()
        moves = []
        for row in cycle.rows:
            if row.step not in MOVES:
                continue
            job = env.api.get(f"/api/jobs/{row.job_id}")
            tasks = [
                (t["action"], t["ended_at"] - t["started_at"])
                for t in job["tasks"]
                if t.get("started_at") is not None and t.get("ended_at") is not None
            ]
            moves.append(Move(size_mib, row.step, row.downtime, row.seconds, tasks))
        return moves
    finally:
        env.stop()


def fmt(v: float | None) -> str:
    return "—" if v is None else f"{v:.1f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes-mib", default="32,1024,8192", help="disk sizes, comma separated")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes_mib.split(",") if s]
    loads = [os.getloadavg()[0]]
    moves: list[Move] = []
    for size in sizes:
        with tempfile.TemporaryDirectory(
            prefix=f"bench-failover-{size}-", dir=os.environ.get("BENCH_TMP")
        ) as tmp:
            moves += measure(size, Path(tmp))
        loads.append(os.getloadavg()[0])
    lines = [
        "# Failover and failback downtime by disk size",
        "",
        "The demo's DR cycle on the lab (real processes on loopback) with lab machine `web1`'s sparse "
        "disk at each size. Downtime: the source machine's shutdown to the recovery machine's boot, as "
        "the job records it. Target: independent of disk size.",
        "",
        "| disk | move | downtime s | job s |",
        "|---:|---|---:|---:|",
    ]
    for m in moves:
        lines.append(f"| {m.size_mib} MiB | {m.step} | {fmt(m.downtime)} | {m.seconds:.1f} |")
    lines += ["", "Per task (seconds):", ""]
    for step in MOVES:
        rows = [m for m in moves if m.step == step]
        if not rows:
            continue
        actions = [a for a, _ in rows[0].tasks]
        lines += [f"### {step}", "", "| task | " + " | ".join(f"{m.size_mib} MiB" for m in rows) + " |"]
        lines.append("|---|" + "---:|" * len(rows))
        for action in actions:
            cells = [fmt(dict(m.tasks).get(action)) for m in rows]
            lines.append(f"| {action} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += [
        f"Load average (1 min) before and after each size: {', '.join(f'{x:.1f}' for x in loads)} on "
        f"{os.cpu_count()} cores (a shared machine: the sizes ran one after the other, not alternating).",
        "",
        "Machine:",
        "",
        machine(),
        "",
    ]
    report = "\n".join(lines)
    print(report)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
