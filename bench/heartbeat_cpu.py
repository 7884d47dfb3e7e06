"""Server CPU per heartbeat, by kind: an idle agent, a process server and a master target.

One real `siterecovery server` (SQLite, or with `--database postgres` a throwaway PostgreSQL) with
N items (`bench.hollow.seed`, 10 process servers and 10 master targets, so each relays or receives
N/10 items), a few hollow components of each kind
registered through the API, then heartbeats one after another from one client: the server
process's CPU time (from /proc) over the heartbeats, minus what it uses idle over the same time
(the RPO monitor's passes, measured for 10 s before), divided by the heartbeats. Sequential
heartbeats are not group-committed (each is its own transaction), so this is an upper bound of a
heartbeat's cost under load; `bench_scale` measures the whole server under load. On PostgreSQL it
also prints the cluster's CPU per heartbeat (postmaster and backends, from /proc, minus idle) and
the statements per heartbeat by text (pg_stat_statements, loaded in the scratch cluster only; the
monitor's statements over the same time are included, as its CPU is).

Run with `python -m bench.heartbeat_cpu [--items 1000] [--points 0] [--heartbeats 300]
[--database sqlite|postgres]`; prints
one line per kind (no results file: `bench/results/scale.md` quotes it with the load average).
"""

from __future__ import annotations

import argparse
import asyncio
import time
from contextlib import ExitStack
from pathlib import Path

import httpx

from bench.bench_scale import HollowComponent, Level, _Plane, hollow_components, register_all
from bench.hollow import seed
from bench.pg import cluster_cpu_seconds, scratch_database, statement_calls
from bench.scale_servers import Servers


def _beat(http: httpx.Client, c: HollowComponent) -> None:
    r = http.post(
        f"{c.url}/api/components/{c.component_id}/heartbeat",
        content=c.body(),
        headers={"Authorization": f"Bearer {c.token}", "content-type": "application/json"},
    )
    if r.status_code != 200:
        raise RuntimeError(f"heartbeat answered {r.status_code}: {r.text[:300]}")
    c.answered(r.json())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=1000)
    parser.add_argument("--points", type=int, default=0, help="recovery points per pair (master targets)")
    parser.add_argument("--heartbeats", type=int, default=300, help="per kind")
    parser.add_argument("--database", choices=("sqlite", "postgres"), default="sqlite")
    args = parser.parse_args()
    with ExitStack() as stack:
        work, url = scratch_database(stack, args.database, "siterecovery-bench-hbcpu-", statements=True)
        servers = Servers(work, url)
        stack.callback(servers.stop)
        _run(args, servers, url)
    return 0


class _Database:
    """PostgreSQL's side of the heartbeats: the cluster's CPU time and statements executed."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.postgres = url.startswith("postgresql")

    def cpu(self) -> float:
        return cluster_cpu_seconds(self.url) if self.postgres else 0.0

    def calls(self) -> dict[str, int]:
        return statement_calls(self.url) if self.postgres else {}

    def report(self, cpu: float, before: dict[str, int], done: int) -> str:
        if not self.postgres:
            return ""
        after = self.calls()
        delta = {q: n - before.get(q, 0) for q, n in after.items() if n > before.get(q, 0)}
        top = sorted(delta.items(), key=lambda kv: -kv[1])[:10]
        lines = [
            f"    PostgreSQL: {1000 * cpu / done:.2f} ms CPU, "
            f"{sum(delta.values()) / done:.2f} statements per heartbeat"
        ]
        lines += [f"      {n / done:6.2f}  {' '.join(q.split())[:110]}" for q, n in top]
        return "\n".join(lines)


def _run(args: argparse.Namespace, servers: Servers, url: str) -> None:
    servers.start_one()
    plane = _Plane(url)
    seed(plane, args.items, 10, 10)  # type: ignore[arg-type]
    plane.db.engine.dispose()
    components = hollow_components(Level("sqlite", args.items, args.points, 1, 10), servers.urls)
    groups = {
        "agent": [c for c in components if c.kind == "agent"][:100],
        "master-target": [c for c in components if c.kind == "master-target"][:3],
        "process-server": [c for c in components if c.kind == "process-server"][:3],
    }
    chosen = [c for group in groups.values() for c in group]
    asyncio.run(register_all(chosen, (servers.state / "passphrase").read_text().strip()))
    time.sleep(3)
    database = _Database(url)
    cpu0, db0, t0 = servers.cpu_seconds(), database.cpu(), time.monotonic()
    time.sleep(10)
    idle = (servers.cpu_seconds() - cpu0) / (time.monotonic() - t0)
    db_idle = (database.cpu() - db0) / (time.monotonic() - t0)
    print(f"idle server: {100 * idle:.1f} % of a core (RPO monitor at {args.items} items)")
    with httpx.Client(timeout=60) as http:
        for kind, group in groups.items():
            for c in group:  # the first heartbeat brings the desired state and the full lists
                _beat(http, c)
            calls0 = database.calls()
            cpu0, db0, t0, done = servers.cpu_seconds(), database.cpu(), time.monotonic(), 0
            while done < args.heartbeats:
                for c in group:
                    _beat(http, c)
                    done += 1
            wall = time.monotonic() - t0
            cpu = servers.cpu_seconds() - cpu0 - idle * wall
            db_cpu = database.cpu() - db0 - db_idle * wall
            load = Path("/proc/loadavg").read_text().split()[0]
            print(
                f"{kind}: {1000 * cpu / done:.2f} ms server CPU per heartbeat "
                f"({done} heartbeats, {args.items} items, {args.points} points/pair, "
                f"{args.database}; load {load})"
            )
            if database.postgres:
                print(database.report(db_cpu, calls0, done))


if __name__ == "__main__":
    raise SystemExit(main())
