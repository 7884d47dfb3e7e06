"""Run the benchmarks: each `bench/bench_*.py` module's `main()`, in name order, or those named.

`python -m bench [NAME ...]` (names without the `bench_` prefix, e.g. `rpo points`). One knob scales
them all down for a quick run: `SITERECOVERY_BENCH_SCALE` (default 1.0) multiplies image sizes and
run times, which this runner turns into each bench's own options; `SITERECOVERY_BENCH_SECONDS`
overrides the RPO bench's churn time per level. A bench that fails does not stop the others; the
exit status is non-zero if any failed.
"""

from __future__ import annotations

import importlib
import os
import sys
import time
import traceback
from pathlib import Path


def scaled_args(name: str, scale: float) -> list[str]:
    """Each bench's own options for `scale` (the points and RPO benches read the knob themselves)."""
    if scale == 1.0:
        return []
    if name in ("replication", "resync"):
        rounds = ["--rounds", "1"] if name == "replication" and scale < 1 else []
        return ["--size-mib", str(max(64, round(2048 * scale))), *rounds]
    if name == "failover":
        return ["--sizes-mib", "32,1024"] if scale < 1 else []
    if name == "before_image":
        return ["--size-mib", str(max(64, round(512 * scale)))]
    if name == "scale" and scale < 1:  # the bench scales its seconds itself; fewer levels
        return ["--levels", "sqlite:100,sqlite:100:220,sqlite:1000,postgres:1000:0:2"]
    if name == "capture":
        return [
            *("--seconds", str(max(2, round(10 * scale))), "--sustained", str(max(5, round(60 * scale)))),
            *("--rounds", "1" if scale < 1 else "3"),
        ]
    return []


def run(names: list[str]) -> int:
    here = Path(__file__).resolve().parent
    available = sorted(p.stem.removeprefix("bench_") for p in here.glob("bench_*.py"))
    unknown = [n for n in names if n not in available]
    if unknown:
        print(f"unknown bench {', '.join(unknown)}; there are: {', '.join(available)}", file=sys.stderr)
        return 2
    scale = float(os.environ.get("SITERECOVERY_BENCH_SCALE", "1.0"))
    failed: list[str] = []
    for name in names or available:
        module = importlib.import_module(f"bench.bench_{name}")
        args = scaled_args(name, scale)
        print(f"\n## bench_{name} {' '.join(args)}\n", flush=True)
        started = time.monotonic()
        saved, sys.argv = sys.argv, [f"bench.bench_{name}", *args]  # each main() parses sys.argv
        try:
            status = module.main()
        except Exception:  # one broken bench must not hide the others' figures
            traceback.print_exc()
            status = 1
        finally:
            sys.argv = saved
        if status:
            failed.append(name)
        print(f"\n(bench_{name}: {time.monotonic() - started:.0f} s)", flush=True)
    if failed:
        print(f"\nfailed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
