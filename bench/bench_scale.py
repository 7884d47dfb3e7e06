"""Scale of the control plane: hollow components heartbeating through the real API, N items.

Per level: a fresh configuration server (real `siterecovery server` processes: one on SQLite, one or
two on a throwaway PostgreSQL), N protected items written through the product's own models
(`bench.hollow.seed`: 2 disks each, round-robin over the process servers and master targets), and
one hollow component per agent, process server and master target (`bench.hollow.Hollow`) that
registers through the API (passphrase, certificate, token) and then heartbeats like the real one:
heartbeat, wait the rest of its interval (its kind's default idle interval, or `--interval`), again;
on 503 it waits Retry-After plus jitter. Statistics are realistic in size: agents report their
pairs, master targets every pair with `--points` recovery points each (220 ≈ a day of thinned
points; the full lists once, then deltas, as the real client sends them), process servers their
cache; the sequence numbers change on every heartbeat, so every report is a write. Meanwhile an API
client pages through `GET /api/replicatedItems?limit=100` (with details), shows an item and lists
jobs, over and over.

Reported per level: heartbeat p50/p99 (and how many timed out after 30 s or were shed with 503),
heartbeats done / offered per second (offered = components / interval), paged item-list p99, RPO
monitor pass p50/max (as the leader measures it, `GET /api/cluster/self`), server CPU (% of one
core, all processes) and peak RSS, database size. The load generator shares the machine with the
server(s) (and, on the shared build box, with other work): its own CPU use is reported too, and a
done/offered below 1 can be the generator's limit as much as the server's.

Run with `python -m bench.bench_scale [--seconds N] [--levels sqlite:100,...] [--tls]`; writes
bench/results/scale.md. The API is plain HTTP unless `--tls` (the servers' `tls` setting, every
client verifying their CA: `bench.scale_servers`); the table's header says which. A level is
`db:items[:points[:processes[:servers]]]` where `servers` is the
number of process servers and of master targets (default 10, or items/100 when larger).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import platform
import random
import resource
import ssl
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import text

from bench.hb_client import Connection, HeartbeatError
from bench.hollow import agent_stats, machine_name, master_target_stats, process_server_stats, seed
from bench.pg import scratch_database
from bench.scale_servers import Servers
from siterecovery.config import AGENT_INTERVAL, SERVER_INTERVAL
from siterecovery.store.database import Database

RESULTS = Path(__file__).resolve().parent / "results" / "scale.md"
# The components' default idle heartbeat intervals (`siterecovery.cli.dataplane`); `--interval N`
# makes every component heartbeat every N s instead (2 s was the default before this session).
INTERVALS = {"agent": AGENT_INTERVAL, "process-server": SERVER_INTERVAL, "master-target": SERVER_INTERVAL}
TIMEOUT = 30.0
DEFAULT_LEVELS = (
    "sqlite:100,sqlite:100:220,sqlite:1000,postgres:1000:0:1,postgres:1000:0:2,postgres:5000:0:2:50"
)


@dataclass(frozen=True)
class Level:
    db: str
    items: int
    points: int = 0
    processes: int = 1
    servers: int = 10

    @classmethod
    def parse(cls, spec: str) -> Level:
        parts = spec.split(":")
        items = int(parts[1])
        return cls(
            parts[0],
            items,
            int(parts[2]) if len(parts) > 2 else 0,
            int(parts[3]) if len(parts) > 3 else 1,
            int(parts[4]) if len(parts) > 4 else max(10, items // 100),
        )

    @property
    def components(self) -> int:
        return self.items + 2 * self.servers


@dataclass
class Result:
    level: Level
    heartbeat_ms: list[float] = field(default_factory=list)
    by_url: dict[str, list[float]] = field(default_factory=dict)  # heartbeat_ms per server process
    leader_url: str = ""  # the process doing the periodic work (the RPO monitor's passes)
    timed_out: int = 0
    shed: int = 0
    shed_measured: int = 0  # of `shed`, those sent in the measured window (after the first interval)
    errors: int = 0
    list_ms: list[float] = field(default_factory=list)
    list_bytes: int = 0
    pages: int = 0
    monitor_p50: float | None = None
    monitor_max: float | None = None
    cpu_percent: float = 0.0
    rss_mib: float = 0.0
    db_mib: float = 0.0
    loadgen_cpu_percent: float = 0.0  # all its processes, in % of one core
    loadgen_cpu_seconds: float = 0.0  # its worker processes'
    loadgen_processes: int = 1
    connections: int = 0  # HTTP connections the hollow components opened, ramp-up included
    heartbeats_answered: int = 0  # over the whole run, ramp-up included (CPU per heartbeat's divisor)
    server_cpu_seconds: float = 0.0
    seconds: float = 0.0
    offered: float = 0.0  # heartbeats per second the components would send at their intervals
    ramp: float = 0.0  # seconds before measuring (the longest interval)
    load_average: float = 0.0  # of the whole machine over the level (1-minute average at its end)
    # Per server process: heartbeats answered by the lean path or the full stack, token loads,
    # desired states built alone, loop lags and collector pauses (`GET /api/cluster/self`).
    paths: list[dict[str, Any]] = field(default_factory=list)


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


# --- hollow components ------------------------------------------------------------------------


@dataclass
class HollowComponent:
    kind: str
    name: str
    template: bytes  # the heartbeat body with "__SEQ__" where the sequence numbers go
    url: str = ""
    component_id: str = ""
    token: str = ""
    version: str | None = None
    seq: int = 0
    interval: float = 2.0
    points: int = 0  # a master target's points per pair: its lists are then reported as deltas
    pairs: list[str] = field(default_factory=list)
    acked: int | None = None  # the point-list version the server acknowledged
    ca_file: str = ""  # the server's CA, with TLS: the connection verifies the API's certificate

    def body(self) -> bytes:
        self.seq += 1
        if self.kind == "master-target":
            out = self._point_report()
        else:
            out = self.template.replace(b'"__SEQ__"', str(self.seq).encode())
        if self.version:
            out = out[:-1] + b',"desired_version":"' + self.version.encode() + b'"}'
        return out

    def _point_report(self) -> bytes:
        """A master target's report, as the real one's control client sends it (`point_delta`).

        Version v of a pair's list is points v .. v+N-1: every heartbeat one point is taken and
        the oldest thinned away (a busier master target than a 5 s crash interval makes). With no
        points, its deltas name no pair, as the real client's do when nothing changed."""
        v, n, a = self.seq, self.points, self.acked
        stats = json.loads(self.template.replace(b'"__SEQ__"', str(v).encode()))["stats"]
        stats["points_seq"] = v
        if a is None or (n and v - a >= n):
            for pair in stats["pairs"]:
                pair["points"] = [_point(pair["pair_id"], k) for k in range(v, v + n)]
        else:
            stats["points_delta"] = {
                "base": a,
                "pairs": {
                    p: {
                        "removed": [f"{p}-pt{k}" for k in range(a, v)],
                        "added": [_point(p, k) for k in range(a + n, v + n)],
                    }
                    for p in (self.pairs if n else [])
                },
            }
        return json.dumps({"stats": stats}, separators=(",", ":")).encode()

    def answered(self, reply: dict[str, Any]) -> None:
        self.version = reply.get("desired_version") or None
        if self.kind == "master-target":
            self.acked = None if reply.get("points_resync") else reply.get("points_seq")


def _point(pair: str, k: int) -> dict[str, Any]:
    return {"id": f"{pair}-pt{k}", "kind": "crash", "time": 1.7e9 + 5 * k, "seq": k}


def _template(stats: dict[str, Any]) -> bytes:
    text_ = json.dumps({"stats": stats}, separators=(",", ":"))
    for key in ("captured_seq", "acked_seq", "applied_seq"):
        text_ = text_.replace(f'"{key}":0', f'"{key}":"__SEQ__"')
    return text_.encode()


def hollow_components(level: Level, urls: list[str]) -> list[HollowComponent]:
    out = []
    mt_pairs: dict[int, list[str]] = {}
    for i in range(level.items):
        vm = machine_name(i)
        pairs = [f"{vm}-g1-d0", f"{vm}-g1-d1"]
        mt_pairs.setdefault(i % level.servers, []).extend(pairs)
        out.append(HollowComponent("agent", f"onprem/{vm}", _template(agent_stats(pairs, 0))))
    for n in range(level.servers):
        pairs = mt_pairs.get(n, [])
        mt = master_target_stats(pairs, 0, 0)
        out.append(
            HollowComponent(
                "master-target", f"master-target-{n}", _template(mt), points=level.points, pairs=pairs
            )
        )
        ps = process_server_stats(len(pairs))
        out.append(HollowComponent("process-server", f"process-server-{n}", _template(ps)))
    for i, c in enumerate(out):
        c.url = urls[i % len(urls)]
    return out


async def register_all(
    components: list[HollowComponent], passphrase: str, verify: ssl.SSLContext | bool = True
) -> None:
    limits = httpx.Limits(max_connections=16)
    async with httpx.AsyncClient(timeout=120, limits=limits, verify=verify) as http:
        gate = asyncio.Semaphore(16)

        async def one(c: HollowComponent) -> None:
            async with gate:
                r = await http.post(
                    c.url + "/api/components/register",
                    json={"passphrase": passphrase, "kind": c.kind, "name": c.name, "site": "onprem"},
                )
                r.raise_for_status()
                c.component_id, c.token = r.json()["id"], r.json()["token"]

        await asyncio.gather(*(one(c) for c in components))


@dataclass
class Driven:
    """What one load-generator process measured."""

    heartbeat_ms: list[float] = field(default_factory=list)
    by_url: dict[str, list[float]] = field(default_factory=dict)  # heartbeat_ms per server process
    answered: int = 0  # every 200, the ramp-up included
    timed_out: int = 0
    shed: int = 0
    shed_measured: int = 0  # sent after the first interval (the steady state), of `shed`
    errors: int = 0
    cpu_seconds: float = 0.0
    connections: int = 0  # HTTP connections opened


async def _drive(components: list[HollowComponent], stop_at: float, measure_from: float, out: Driven) -> None:
    # One context per process (not picklable): it verifies the server's certificate with its CA.
    cas = {c.ca_file for c in components if c.ca_file}
    contexts = {ca: ssl.create_default_context(cafile=ca) for ca in cas}

    async def component(c: HollowComponent) -> None:
        # Its own connection, as a real component holds one (`bench.hb_client`).
        connection = Connection(c.url, contexts.get(c.ca_file))
        path = f"/api/components/{c.component_id}/heartbeat"
        await asyncio.sleep(random.uniform(0, c.interval))  # components start at random phases
        while time.monotonic() < stop_at:
            started = time.monotonic()
            wait = c.interval
            try:
                r = await asyncio.wait_for(connection.post(path, c.token, c.body(), c.interval), TIMEOUT)
                if r.status == 200:
                    out.answered += 1
                    if started >= measure_from:
                        took = (time.monotonic() - started) * 1000
                        out.heartbeat_ms.append(took)
                        out.by_url.setdefault(c.url, []).append(took)
                    c.answered(json.loads(r.body))
                elif r.status in (429, 503):
                    out.shed += 1
                    out.shed_measured += started >= measure_from
                    wait = float(r.headers.get("retry-after", "2")) * (1 + random.random())
                else:
                    out.errors += 1
            except TimeoutError:
                out.timed_out += 1
            except HeartbeatError:
                out.errors += 1
            # Never past the end: the level's length is its measuring window plus the ramp.
            rest = min(wait - (time.monotonic() - started), stop_at - time.monotonic())
            await asyncio.sleep(max(0.0, rest))
        connection.close()
        out.connections += connection.opened

    await asyncio.gather(*(component(c) for c in components))


def _drive_process(components: list[HollowComponent], stop_at: float, measure_from: float) -> Driven:
    """One load-generator process: its share of the components, in its own event loop."""
    out = Driven()
    before = resource.getrusage(resource.RUSAGE_SELF)
    asyncio.run(_drive(components, stop_at, measure_from, out))
    after = resource.getrusage(resource.RUSAGE_SELF)
    out.cpu_seconds = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    return out


async def drive(
    components: list[HollowComponent], seconds: float, result: Result, api: ApiLoad, processes: int
) -> None:
    """The hollow components in `processes` processes (CLOCK_MONOTONIC is shared), the API here."""
    stop_at = time.monotonic() + seconds
    measure_from = time.monotonic() + max(c.interval for c in components)
    shares = [components[k::processes] for k in range(processes)]
    with ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("fork")) as pool:
        futures = [
            asyncio.wrap_future(pool.submit(_drive_process, share, stop_at, measure_from)) for share in shares
        ]
        async with httpx.AsyncClient(timeout=TIMEOUT, verify=api.verify) as http:
            await api.run(http, stop_at, result)
        for driven in await asyncio.gather(*futures):
            result.heartbeat_ms += driven.heartbeat_ms
            for url, took in driven.by_url.items():
                result.by_url.setdefault(url, []).extend(took)
            result.heartbeats_answered += driven.answered
            result.timed_out += driven.timed_out
            result.shed += driven.shed
            result.shed_measured += driven.shed_measured
            result.errors += driven.errors
            result.loadgen_cpu_seconds += driven.cpu_seconds
            result.connections += driven.connections


@dataclass
class ApiLoad:
    urls: list[str]
    token: str
    verify: ssl.SSLContext | bool = True

    async def run(self, http: httpx.AsyncClient, stop_at: float, result: Result) -> None:
        headers = {"Authorization": f"Bearer {self.token}"}
        n = 0
        while time.monotonic() < stop_at:
            url = self.urls[n % len(self.urls)]
            n += 1
            after: str | None = None
            size = 0
            try:
                while True:  # page through every item, as the CLI does
                    params: dict[str, Any] = {"limit": 100, **({"after": after} if after else {})}
                    started = time.monotonic()
                    r = await http.get(url + "/api/replicatedItems", params=params, headers=headers)
                    result.list_ms.append((time.monotonic() - started) * 1000)
                    size += len(r.content)
                    result.pages += 1
                    after = r.headers.get("X-Next-After")
                    if not after or time.monotonic() >= stop_at:
                        break
                result.list_bytes = max(result.list_bytes, size)
                await http.get(url + f"/api/replicatedItems/{machine_name(0)}", headers=headers)
                await http.get(url + "/api/jobs", headers=headers)
            except httpx.HTTPError:
                result.errors += 1
            await asyncio.sleep(0.5)


# --- one level --------------------------------------------------------------------------------


class _Plane:
    def __init__(self, url: str) -> None:
        self.db = Database(url)


def _describe(interval: float) -> str:
    if interval:
        return f"every component every {interval:g} s"
    return f"agents {AGENT_INTERVAL:g} s, process servers and master targets {SERVER_INTERVAL:g} s (defaults)"


def run_level(
    level: Level,
    seconds: float,
    loadgen: int,
    interval: float,
    tls: bool = False,
    profile: Path | None = None,
) -> Result:
    result = Result(level)
    with ExitStack() as stack:
        work, url = scratch_database(stack, level.db, "siterecovery-bench-scale-")
        servers = Servers(work, url, tls)
        stack.callback(servers.stop)
        servers.start_one()  # the first applies the migrations
        plane = _Plane(url)
        stack.callback(plane.db.engine.dispose)
        started = time.monotonic()
        for start in range(0, level.items, 1000):
            seed(plane, min(1000, level.items - start), level.servers, level.servers, start=start)  # type: ignore[arg-type]
        for _ in range(level.processes - 1):
            servers.start_one()
        passphrase = (servers.state / "passphrase").read_text().strip()
        components = hollow_components(level, servers.urls)
        for c in components:
            c.interval = interval or INTERVALS[c.kind]
            c.ca_file = str(servers.ca_file or "")
        result.offered = sum(1 / c.interval for c in components)
        result.ramp = max(c.interval for c in components)
        asyncio.run(register_all(components, passphrase, servers.verify()))
        print(f"  {level}: seeded and registered in {time.monotonic() - started:.0f} s", flush=True)

        if profile is not None:  # py-spy on every server process for the level's whole length
            stack.callback(servers.profile(profile, f"{level.db}-{level.items}", seconds))
        cpu0, wall0 = servers.cpu_seconds(), time.monotonic()
        self0 = resource.getrusage(resource.RUSAGE_SELF)
        rss = [0.0]

        async def sample_rss() -> None:
            while True:
                rss[0] = max(rss[0], servers.rss_mib())
                await asyncio.sleep(1)

        async def main() -> None:
            sampler = asyncio.create_task(sample_rss())
            api = ApiLoad(servers.urls, servers.token, servers.verify())
            await drive(components, seconds, result, api, loadgen)
            sampler.cancel()

        asyncio.run(main())
        result.seconds = time.monotonic() - wall0
        result.server_cpu_seconds = servers.cpu_seconds() - cpu0
        result.cpu_percent = 100 * result.server_cpu_seconds / result.seconds
        self1 = resource.getrusage(resource.RUSAGE_SELF)
        used = (self1.ru_utime + self1.ru_stime) - (self0.ru_utime + self0.ru_stime)
        result.loadgen_cpu_percent = 100 * (used + result.loadgen_cpu_seconds) / result.seconds
        result.loadgen_processes = loadgen
        result.rss_mib = rss[0]
        result.load_average = float(Path("/proc/loadavg").read_text().split()[0])
        for u in servers.urls:
            auth = {"Authorization": f"Bearer {servers.token}"}
            me = httpx.get(u + "/api/cluster/self", headers=auth, verify=servers.verify()).json()
            result.paths.append(me.get("heartbeats", {}))
            if me.get("leader"):
                result.leader_url = u
                result.monitor_p50, result.monitor_max = me["pass_seconds_p50"], me["pass_seconds_max"]
        result.db_mib = db_size(url, servers.state) / (1 << 20)
    return result


def db_size(url: str, state: Path) -> float:
    if url.startswith("sqlite"):
        return float(sum(p.stat().st_size for p in state.glob("siterecovery.db*")))
    db = Database(url)
    try:
        with db.engine.connect() as c:
            return float(c.execute(text("SELECT pg_database_size(current_database())")).scalar() or 0)
    finally:
        db.engine.dispose()


# --- report -----------------------------------------------------------------------------------


def fmt(v: float | None, unit: str = "", digits: int = 0) -> str:
    return "—" if v is None else f"{v:.{digits}f}{unit}"


def row(r: Result) -> str:
    lv = r.level
    offered = r.offered
    measured = r.seconds - r.ramp  # the first interval ramps up (components start at random phases)
    done = len(r.heartbeat_ms) / measured if measured > 0 else 0.0
    hb = f"{fmt(pct(r.heartbeat_ms, 0.5), ' ms')} / {fmt(pct(r.heartbeat_ms, 0.99), ' ms')}"
    if r.leader_url and len(r.by_url) > 1:  # the leader runs the monitor's passes beside its heartbeats
        others = [t for u, ms in r.by_url.items() if u != r.leader_url for t in ms]
        leader = fmt(pct(r.by_url.get(r.leader_url, []), 0.99))
        hb += f" (p99 leader {leader}, others {fmt(pct(others, 0.99))})"
    monitor = f"{fmt(r.monitor_p50, ' s', 2)} / {fmt(r.monitor_max, ' s', 2)}"
    plural = "es" if lv.processes > 1 else ""
    db = f"{'SQLite' if lv.db == 'sqlite' else 'PostgreSQL'}, {lv.processes} process{plural}"
    items = f"{lv.items:,}" + (f", {lv.points} points/pair" if lv.points else "")
    comps = f"{lv.items:,} + {lv.servers} + {lv.servers}"
    answered = r.heartbeats_answered
    per_beat = f"{1000 * r.server_cpu_seconds / answered:.1f} ms" if answered else "—"
    if r.shed and answered:  # a shed heartbeat costs CPU too: per answer, 503s included
        per_beat += f" ({1000 * r.server_cpu_seconds / (answered + r.shed):.1f} ms)"
    stalls = _stalls(r.paths)
    return (
        f"| {db} | {items} | {comps} | {hb} | {stalls} "
        f"| {r.timed_out} / {r.shed} ({r.shed_measured}) | {done:.0f} / {offered:.0f} "
        f"| {fmt(pct(r.list_ms, 0.99), ' ms')} "
        f"({r.list_bytes / 1e6:.1f} MB in {max(1, -(-lv.items // 100))} pages) "
        f"| {monitor} | {r.cpu_percent:.0f} % / {r.rss_mib:.0f} MiB | {per_beat} "
        f"| {r.db_mib:.1f} MiB | {r.loadgen_cpu_percent:.0f} % ({r.loadgen_processes}) "
        f"| {r.load_average:.1f} |"
    )


def _stalls(paths: list[dict[str, Any]]) -> str:
    """Every server process's loop-lag spells and collector pauses of 50 ms or more (`server.pauses`),
    the longest of each in brackets."""
    if not paths or "loop_lags" not in paths[0]:
        return "—"
    lags, pauses = sum(p["loop_lags"] for p in paths), sum(p["gc_pauses"] for p in paths)
    lag_max = max(p["loop_lag_max_ms"] for p in paths)
    longest = max(paths, key=lambda p: float(p["gc_pause_max_ms"]))
    pause_max, generation = longest["gc_pause_max_ms"], longest.get("gc_pause_max_generation", -1)
    return f"{lags} ({lag_max:.0f} ms) / {pauses} ({pause_max:.0f} ms, generation {generation})"


def transport(tls: bool) -> str:
    """How the clients reached the API in a run: said in the table's header."""
    return "HTTPS (`--tls`; clients verify the server's CA)" if tls else "plain HTTP"


def header(tls: bool) -> str:
    return HEADER.replace("| database |", f"| database (API over {transport(tls)}) |", 1)


HEADER = (
    "| database | items | components (agents + PS + MT) | heartbeat p50 / p99 "
    "| loop lags / GC pauses ≥ 50 ms (longest) "
    "| timed out / shed (503) (shed after the first interval) "
    "| heartbeats done / offered per s | paged item list p99 (whole list) | RPO monitor pass p50 / max "
    "| server CPU / peak RSS | server CPU per heartbeat | DB size | load generator CPU (processes) "
    "| machine load average |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
)


def write(results: list[Result], seconds: float, note: str, intervals: str, tls: bool = False) -> str:
    lines = [
        "# Control-plane scale (bench_scale)",
        "",
        f"{platform.node()}: {os.cpu_count()} CPUs (shared), {platform.python_version()}; "
        f"{seconds:.0f} s of heartbeats per level; heartbeat intervals {intervals}; "
        f"API over {transport(tls)}; `{' '.join(sys.argv[1:]) or 'defaults'}`.",
        "",
        header(tls),
        *(row(r) for r in results),
        "",
        note,
        "",
    ]
    return "\n".join(lines)


NOTE = """How to read it. *Offered* is the sum over components of 1 ÷ interval; a component heartbeats again
one interval after the previous one started (or after Retry-After plus jitter when shed), so when
heartbeats are slow fewer are offered and done/offered drops below 1. *Timed out* counts heartbeats
without an answer within 30 s (before this work: every one at 1,000 items); *shed* counts 503
answers (admission control, `control/admission.py`) over the whole run, the first interval (when
every component's first heartbeat arrives) included; in brackets those sent after it. The load
generator runs on the same 2 shared cores as the server(s) — and the build box is shared with other
work while this runs — so its own CPU use is shown (all its processes, in % of one core; the number
of processes in brackets). *Server CPU per heartbeat* is the server processes' CPU time divided by
the heartbeats answered over the run — the monitor's passes and the item-list load included, so it
is an upper bound of a heartbeat's own cost; when some were shed, the figure in brackets divides by
every answer, 503s included (a shed heartbeat costs CPU too, much less than an answered one). RPO
monitor pass: the leader's own timing of its recent passes (`GET /api/cluster/self`). Item list:
each page is 100 items with their full records (`?limit=100`), the whole list paged through by
`X-Next-After`; p99 is per page. With several server processes the heartbeat p99 is also given for
the heartbeats answered by the leader (the process running the RPO monitor's passes) and by the
others. *Loop lags / GC pauses*: over the run, every server process
together, the spells of 50 ms or more when a process's event loop ran late (it answers nothing
then) and the garbage collections that long (they hold the GIL), the longest of each in brackets
(`server.pauses`, since the process began serving, the first interval included) —
a heartbeat p99 above 100 ms with few spells points at the machine's cores, with many at the server."""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    scale = float(os.environ.get("SITERECOVERY_BENCH_SCALE", "1.0"))
    parser.add_argument("--seconds", type=float, default=max(10.0, 60.0 * scale))
    parser.add_argument("--levels", default=DEFAULT_LEVELS)
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument(
        "--interval", type=float, default=0.0, help="every component's heartbeat interval (default: theirs)"
    )
    parser.add_argument(
        "--tls", action="store_true", help="servers serve the API over HTTPS; clients verify their CA"
    )
    parser.add_argument(
        "--loadgen-processes",
        type=int,
        default=0,
        help="processes running the hollow components (default: 1 per 1,000 components, at most 4)",
    )
    parser.add_argument(
        "--profile",
        type=Path,
        help="record each server process with py-spy during each level (collapsed stacks in this folder)",
    )
    args = parser.parse_args()
    results = []
    for spec in args.levels.split(","):
        level = Level.parse(spec)
        print(f"level {spec} ...", flush=True)
        try:
            loadgen = args.loadgen_processes or min(4, max(1, -(-level.components // 1000)))
            results.append(run_level(level, args.seconds, loadgen, args.interval, args.tls, args.profile))
        except Exception as exc:  # one level's failure (e.g. no PostgreSQL) must not lose the others
            print(f"  level {spec} failed: {exc!r}", flush=True)
            continue
        print(header(args.tls).splitlines()[0] + "\n" + row(results[-1]), flush=True)
        r = results[-1]
        print(
            f"  connections opened {r.connections} for {r.heartbeats_answered + r.shed} heartbeats answered"
            f" (200 or 503); server CPU {r.server_cpu_seconds:.1f} s; per server {r.paths}",
            flush=True,
        )
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(write(results, args.seconds, NOTE, _describe(args.interval), args.tls))
    return 0 if results else 1


if __name__ == "__main__":
    sys.exit(main())
