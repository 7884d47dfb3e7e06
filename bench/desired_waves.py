"""Server CPU per heartbeat that meets its desired state cold, warm, and after a change.

`bench_scale` mixes a level's first heartbeats (each component's first on its server process:
the desired state is built), the steady ones, the RPO monitor and the item-list load, on a box
whose load decides how much is shed — its CPU per done heartbeat cannot say what the cold path
costs. Here N items are seeded as `bench_scale` seeds them, on PostgreSQL with one or two real
`siterecovery server` processes, every hollow component registers, and then every component
heartbeats exactly once per wave, 16 at a time (the admission limit), a shed one again until
answered:

1. *cold*: the processes have built no desired state yet (their start);
2. *warm*: nothing changed, so each reuses the state its process built;
3. *after a change*: the desired epoch is bumped (as any change of an item or policy does), so
   every state is built again, with the items' records already parsed.

Per wave: server CPU seconds (all processes, from /proc) per heartbeat, PostgreSQL's, heartbeats
shed, wall time. CPU time is what a loaded box distorts least; the machine's load average is
printed beside it. Run with `python -m bench.desired_waves [--items 5000] [--processes 2]`
(no results file: quote the lines with the load average).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time
from contextlib import ExitStack
from pathlib import Path

from bench.bench_scale import HollowComponent, Level, _Plane, hollow_components, register_all
from bench.hb_client import Connection
from bench.hollow import seed
from bench.pg import cluster_cpu_seconds, scratch_database
from bench.scale_servers import Servers
from siterecovery.store import desired_epoch

AT_ONCE = 16


async def _wave(components: list[HollowComponent]) -> int:
    """Every component heartbeats once (a shed one again until answered); the 503s counted."""
    gate = asyncio.Semaphore(AT_ONCE)
    shed = 0

    async def one(c: HollowComponent, connection: Connection) -> None:
        nonlocal shed
        path = f"/api/components/{c.component_id}/heartbeat"
        async with gate:
            while True:
                r = await connection.post(path, c.token, c.body(), c.interval)
                if r.status == 200:
                    c.answered(json.loads(r.body))
                    return
                if r.status not in (429, 503):
                    raise RuntimeError(f"heartbeat answered {r.status}: {r.body[:200]!r}")
                shed += 1
                await asyncio.sleep(random.uniform(0.05, 0.2))

    connections = [Connection(c.url) for c in components]
    try:
        await asyncio.gather(*(one(c, k) for c, k in zip(components, connections, strict=True)))
    finally:
        for k in connections:
            k.close()
    return shed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=5000)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--profile", type=Path, help="py-spy each server per wave (collapsed stacks here)")
    args = parser.parse_args()
    level = Level("postgres", args.items, 0, args.processes, max(10, args.items // 100))
    with ExitStack() as stack:
        work, url = scratch_database(stack, "postgres", "siterecovery-bench-waves-")
        servers = Servers(work, url)
        stack.callback(servers.stop)
        servers.start_one()
        plane = _Plane(url)
        stack.callback(plane.db.engine.dispose)
        for start in range(0, level.items, 1000):
            seed(plane, min(1000, level.items - start), level.servers, level.servers, start=start)  # type: ignore[arg-type]
        for _ in range(level.processes - 1):
            servers.start_one()
        components = hollow_components(level, servers.urls)
        passphrase = (servers.state / "passphrase").read_text().strip()
        asyncio.run(register_all(components, passphrase))
        for wave in ("cold", "warm", "after a change"):
            if wave == "after a change":
                with plane.db.session() as s:
                    desired_epoch.bump(s)
            label = f"{args.items}-{wave.replace(' ', '-')}"
            stop = servers.profile(args.profile, label, 600) if args.profile else None
            cpu, pg, wall = servers.cpu_seconds(), cluster_cpu_seconds(url), time.monotonic()
            shed = asyncio.run(_wave(components))
            cpu, pg = servers.cpu_seconds() - cpu, cluster_cpu_seconds(url) - pg
            n = len(components)
            load = Path("/proc/loadavg").read_text().split()[0]
            print(
                f"{args.items} items, {args.processes} processes, {wave:14s}: server CPU "
                f"{1000 * cpu / n:.2f} ms/heartbeat, PostgreSQL {1000 * pg / n:.2f} ms, "
                f"{shed} shed, {time.monotonic() - wall:.1f} s wall for {n} (load {load})",
                flush=True,
            )
            if stop is not None:
                stop(interrupt=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
