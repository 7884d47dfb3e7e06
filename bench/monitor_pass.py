"""The RPO monitor's passes at N items on a database, in process: what each pass costs.

N items (`bench.hollow.seed`, 50 process servers and 50 master targets), every agent and master
target reporting (caught up), then passes one second apart of simulated time while a tenth of
the agents heartbeat between passes (as agents at a 10 s interval do): per pass its wall time,
this process's CPU time, its statements, the item rows it wrote and the items it evaluated
(changed inputs, due crossings; `dr.monitor_state`); then the PostgreSQL side
(`--database postgres`: the cluster's CPU over the passes). The first pass after start is shown
on its own (it parses every item's replication and decodes every report).

Run with `python -m bench.monitor_pass [--items 5000] [--passes 20] [--database postgres]`;
prints one line per pass (no results file: the A/B figures go in a report with the load average).
"""

from __future__ import annotations

import argparse
import resource
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from sqlalchemy import event, select, update

from bench.hollow import agent_stats, master_target_stats, seed
from bench.pg import cluster_cpu_seconds, scratch_database
from siterecovery.config import load_server_config
from siterecovery.dr.monitor import run_pass
from siterecovery.store.context import open_control_plane
from siterecovery.store.models import Component, ReplicatedItem
from siterecovery.store.points import store_report
from siterecovery.store.record import ItemRecord


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=5000)
    parser.add_argument("--passes", type=int, default=20)
    parser.add_argument("--database", choices=("sqlite", "postgres"), default="postgres")
    args = parser.parse_args()
    with ExitStack() as stack:
        work, url = scratch_database(stack, args.database, "siterecovery-bench-monitor-")
        cp = open_control_plane(load_server_config(work / "state", database_url=url))
        stack.callback(cp.db.engine.dispose)
        inv = seed(cp, args.items, 50, 50)
        t0 = time.time()
        agents: list[tuple[str, list[str]]] = []
        with cp.db.session() as s:
            by_mt: dict[str, list[str]] = {}
            for item in s.scalars(select(ReplicatedItem)):
                rep = ItemRecord.model_validate(item.details).replication
                assert rep is not None
                pairs = [p.pair_id for p in rep.pairs]
                by_mt.setdefault(rep.master_target, []).extend(pairs)
                cid = f"agent-{item.machine}"
                s.add(
                    Component(
                        id=cid,
                        kind="agent",
                        name=f"onprem/{item.machine}",
                        last_heartbeat=t0,
                        stats=agent_stats(pairs, 7),
                    )
                )
                agents.append((cid, pairs))
            for mt_id, pairs in by_mt.items():
                mt = s.get(Component, mt_id)
                assert mt is not None
                mt.stats, _ = store_report(s, mt, master_target_stats(pairs, 7, points_per_pair=20))
        del inv
        counted = {"statements": 0, "rows": 0}

        def on_statement(_c: Any, _cur: Any, statement: str, params: Any, _x: Any, many: bool) -> None:
            counted["statements"] += 1
            if statement.startswith("UPDATE replicated_items"):
                counted["rows"] += len(params) if many else 1

        event.listen(cp.db.engine, "before_cursor_execute", on_statement)
        db0 = cluster_cpu_seconds(url) if args.database == "postgres" else 0.0
        walls: list[float] = []
        for n in range(args.passes):
            at = t0 + n + 1
            with cp.db.session() as s:
                tenth = agents[n % 10 :: 10]
                s.execute(
                    update(Component),
                    [
                        {"id": cid, "last_heartbeat": at, "stats": agent_stats(pairs, 7)}
                        for cid, pairs in tenth
                    ],
                )
            counted.update(statements=0, rows=0)
            cpu, wall = _cpu(), time.monotonic()
            count = run_pass(cp, now=at)
            wall = time.monotonic() - wall
            walls.append(wall)
            load = Path("/proc/loadavg").read_text().split()[0]
            print(
                f"pass {n}: {wall:.3f} s wall, {_cpu() - cpu:.3f} s CPU, {counted['statements']} statements, "
                f"{counted['rows']} item rows written, {count.evaluated} items evaluated "
                f"({count.changed} changed, {count.due} due{', full' if count.full else ''}) (load {load})"
            )
        if args.database == "postgres":
            print(f"PostgreSQL CPU over the passes: {cluster_cpu_seconds(url) - db0:.2f} s")
        rest = sorted(walls[1:])
        print(
            f"{args.items} items: first pass {walls[0]:.3f} s; "
            f"others p50 {rest[len(rest) // 2]:.3f} s, max {rest[-1]:.3f} s"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
