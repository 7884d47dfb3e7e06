"""RPO under sustained write churn: p50/p99/max at 5, 20 and 50 MB/s, through the real deployment.

`Environment` (`siterecovery.demo.environment`) starts the lab, the configuration server, process
servers and master targets as real processes on loopback; `web1` (a 2 GiB sparse disk) is powered
on with its real mobility agent and guest, and replication is enabled (agent → ps-onprem →
mt-cloud, mutual TLS). Then, per churn level, `fio --ioengine=nbd` writes 64 KiB random blocks of
incompressible data at a fixed rate through the agent's NBD export (the upper half of the disk; the
guest keeps appending its log, ~0.26 MB/s, in the lower half). Every 0.25 s the bench samples:

- the item's `rpo_seconds` as the configuration server's monitor computes it (every second);
- the age of the newest recovery point the master target holds (`recoveryPoints`);
- a data-plane RPO from the components' own reports in `GET /api/servers`: at each master-target
  report, the time since the newest agent report whose `captured_seq` the master target's
  `applied_seq` covers (an upper bound on the age of the oldest write not yet durable on the
  recovery side, ±1 heartbeat of 0.5 s);
- RSS and CPU time of the agent, process server, master target and configuration server.

After each level it waits for the master target to catch up (the catch-up time is reported), then
reads the recovery-point interval from the points taken during the level. Target (DESIGN.md):
a point every ≤ 5 s and p99 RPO ≤ 5 s at 20 MB/s per disk; bounded memory. MB is 10^6 bytes.
`--seconds` (default `SITERECOVERY_BENCH_SECONDS`, else 20 x `SITERECOVERY_BENCH_SCALE`) sets the
churn time per level. Prints a table and writes `bench/results/rpo.md`.
Run with `python -m bench.bench_rpo [--seconds N] [--rates 5,20,50]`.
"""

from __future__ import annotations

import argparse
import bisect
import itertools
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from siterecovery.demo.cycle import Cycle
from siterecovery.demo.environment import Environment
from siterecovery.lab import runtime

MB = 1_000_000
MiB = 1 << 20
GiB = 1 << 30
SAMPLE_EVERY = 0.25
CATCH_UP_TIMEOUT = 300.0
JOB_TIMEOUT = 600.0
MACHINE = "web1"
LABEL = "disk0"
WATCHED = ("agent", "ps-onprem", "mt-cloud", "server")
RESULTS = Path(__file__).resolve().parent / "results" / "rpo.md"


class BenchError(RuntimeError):
    pass


# ---- figures -------------------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (with few samples p99 is the maximum, which is the honest reading)."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def triple(values: list[float]) -> str:
    if not values:
        return "-"
    return f"{percentile(values, 50):.2f} / {percentile(values, 99):.2f} / {max(values):.2f}"


# ---- processes -----------------------------------------------------------------------------------

_CLK_TCK = os.sysconf("SC_CLK_TCK")


def rss_bytes(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0


def cpu_seconds(pid: int) -> float:
    """utime + stime of the process (its threads included)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return 0.0
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


def device_written(path: Path) -> int:
    """Bytes written so far to the block device holding `path` (every hop's spool, cache and disks)."""
    dev = os.stat(path).st_dev
    stat = Path(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}/stat")
    try:
        return int(stat.read_text().split()[6]) * 512
    except (FileNotFoundError, IndexError, ValueError):
        return 0


def watched_pids(env: Environment) -> dict[str, int]:
    pids = {name: env.procs[name].pid for name in WATCHED if name in env.procs}
    pidfile = runtime.run_dir(env.lab_dir, "onprem", MACHINE) / "export.pid"
    pids["agent"] = int(pidfile.read_text().split()[0])
    return pids


# ---- sampling ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Report:
    """A component's statistic as of its last heartbeat (wall-clock time of that heartbeat)."""

    at: float
    seq: int


@dataclass
class Level:
    rate_mb: int
    seconds: int
    achieved_mb: float = 0.0
    rpo: list[float] = field(default_factory=list)
    point_age: list[float] = field(default_factory=list)
    data_plane: list[float] = field(default_factory=list)
    intervals: list[float] = field(default_factory=list)
    catch_up: float = math.nan
    device_mb_s: float = 0.0
    load: float = 0.0
    backlog_max: int = 0
    spool_max: int = 0
    rss_max: dict[str, int] = field(default_factory=dict)
    cpu_percent: dict[str, float] = field(default_factory=dict)


class Sampler:
    """Polls the configuration server on one kept-alive connection and records what it sees."""

    def __init__(self, env: Environment) -> None:
        self.client = httpx.Client(
            base_url=env.url, headers={"Authorization": f"Bearer {env.token}"}, timeout=30
        )
        self.pids = watched_pids(env)
        self.captured: list[Report] = []  # the agent's reports, in time order (captured_seq only grows)
        self.applied: list[Report] = []  # the master target's reports

    def close(self) -> None:
        self.client.close()

    def _get(self, path: str) -> Any:
        resp = self.client.get(path)
        resp.raise_for_status()
        return resp.json()

    def servers(self) -> tuple[Report | None, Report | None, dict[str, Any]]:
        now = time.time()
        agent = mt = None
        ps: dict[str, Any] = {}
        for server in self._get("/api/servers"):
            age = server.get("heartbeat_age_seconds")
            stats = server.get("stats") or {}
            if age is None:
                continue
            if server["name"] == f"onprem/{MACHINE}" and stats.get("pairs"):
                pair = stats["pairs"][0]
                agent = Report(now - age, int(pair["captured_seq"]))
                ps["spool_bytes"] = int(pair.get("spool_bytes", 0))
            elif server["name"] == "mt-cloud" and stats.get("pairs"):
                mt = Report(now - age, int(stats["pairs"][0]["applied_seq"]))
            elif server["name"] == "ps-onprem":
                ps["backlog_bytes"] = int(stats.get("backlog_bytes", 0))
        for report, into in ((agent, self.captured), (mt, self.applied)):
            if report is not None and (not into or report.at > into[-1].at + 1e-3):
                into.append(report)
        return agent, mt, ps

    def data_plane_rpo(self, mt: Report) -> float:
        """Time since the newest agent report whose captured writes the master target had applied.

        Every write captured by then is durable on the recovery side, so whatever is not was
        captured later: this bounds the age of the oldest write a failover would lose.
        """
        times = [r.at for r in self.captured]
        upto = bisect.bisect_right(times, mt.at)  # reports the master target could have seen
        covered = upto
        while covered > 0 and self.captured[covered - 1].seq > mt.seq:
            covered -= 1
        if covered == 0:
            return math.nan
        return max(0.0, mt.at - self.captured[covered - 1].at)

    def sample(self, level: Level, during_churn: bool) -> tuple[Report | None, Report | None]:
        now = time.time()
        item = self._get(f"/api/replicatedItems/{MACHINE}")
        points = self._get(f"/api/replicatedItems/{MACHINE}/recoveryPoints")
        agent, mt, ps = self.servers()
        if during_churn:
            if item.get("rpo_seconds") is not None:
                level.rpo.append(float(item["rpo_seconds"]))
            taken = [p for p in points if p["kind"] != "latest"]
            if taken:
                level.point_age.append(max(0.0, now - max(float(p["time"]) for p in taken)))
            if mt is not None:
                lag = self.data_plane_rpo(mt)
                if not math.isnan(lag):
                    level.data_plane.append(lag)
            level.backlog_max = max(level.backlog_max, ps.get("backlog_bytes", 0))
            level.spool_max = max(level.spool_max, ps.get("spool_bytes", 0))
            for name, pid in self.pids.items():
                level.rss_max[name] = max(level.rss_max.get(name, 0), rss_bytes(pid))
        return agent, mt

    def point_times(self) -> list[float]:
        points = self._get(f"/api/replicatedItems/{MACHINE}/recoveryPoints")
        return sorted(float(p["time"]) for p in points if p["kind"] != "latest")


# ---- the run -------------------------------------------------------------------------------------


def fio_command(sock: Path, rate_mb: int, seconds: int, disk_size: int, out: Path) -> list[str]:
    half = disk_size // 2
    return [
        "fio",
        "--name=churn",
        "--ioengine=nbd",
        f"--uri=nbd+unix:///{LABEL}?socket={sock}",
        "--rw=randwrite",
        "--bs=64k",
        "--iodepth=4",
        f"--rate={rate_mb * MB}",
        "--refill_buffers",  # incompressible data: zstd must not make the churn look cheaper
        f"--offset={half}",
        f"--size={half}",  # the upper half: the guest's log grows from the start of the disk
        "--time_based",
        f"--runtime={seconds}",
        "--output-format=json",
        f"--output={out}",
    ]


def enable_replication(env: Environment) -> None:
    env.api.post("/api/policies", {"name": "bench"})
    env.fabric("onprem").power_on(MACHINE)
    cycle = Cycle(env, MACHINE)
    cycle.wait_agent("onprem")
    # The guest first runs the oracle over the whole disk through the export (a 2 GiB read): let it
    # finish and start appending, so the first churn level does not share the agent with that scan.
    cycle.wait_records("onprem", 16, timeout=JOB_TIMEOUT)
    job_id = env.api.post(
        "/api/replicatedItems",
        {"machine": MACHINE, "policy": "bench", "process_server": "ps-onprem", "master_target": "mt-cloud"},
    )["job_id"]
    deadline = time.monotonic() + JOB_TIMEOUT
    while (job := env.api.get(f"/api/jobs/{job_id}"))["state"] not in ("succeeded", "failed", "cancelled"):
        if time.monotonic() > deadline:
            raise BenchError(f"enable replication: job {job_id} still {job['state']}")
        time.sleep(0.3)
    if job["state"] != "succeeded":
        raise BenchError(f"enable replication: job {job_id} {job['state']}: {job.get('error')}")


def wait_caught_up(sampler: Sampler, level: Level) -> float:
    """Seconds until the master target has applied what the agent had captured when churn stopped."""
    started = time.monotonic()
    target: int | None = None
    while time.monotonic() - started < CATCH_UP_TIMEOUT:
        agent, mt = sampler.sample(level, during_churn=False)
        if target is None and agent is not None and agent.at >= time.time() - 1.0:
            target = agent.seq
        if target is not None and mt is not None and mt.seq >= target:
            return time.monotonic() - started
        time.sleep(SAMPLE_EVERY)
    raise BenchError(f"the master target did not catch up within {CATCH_UP_TIMEOUT:.0f} s")


def run_level(env: Environment, sampler: Sampler, level: Level, disk_size: int, work: Path) -> None:
    sock = runtime.agent_socket(runtime.run_dir(env.lab_dir, "onprem", MACHINE), LABEL)
    out = work / f"fio-{level.rate_mb}.json"
    cpu_before = {name: cpu_seconds(pid) for name, pid in sampler.pids.items()}
    written = device_written(work)
    wall = time.monotonic()
    started = time.time()
    fio = subprocess.Popen(
        fio_command(sock, level.rate_mb, level.seconds, disk_size, out),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        next_at = time.monotonic()
        while fio.poll() is None:
            sampler.sample(level, during_churn=True)
            next_at += SAMPLE_EVERY
            time.sleep(max(0.0, next_at - time.monotonic()))
    finally:
        if fio.poll() is None:
            fio.kill()
        err, _ = fio.communicate()
    ended = time.time()
    elapsed = time.monotonic() - wall
    level.device_mb_s = (device_written(work) - written) / elapsed / MB
    level.load = os.getloadavg()[0]
    level.cpu_percent = {
        name: 100 * (cpu_seconds(pid) - cpu_before[name]) / elapsed for name, pid in sampler.pids.items()
    }
    if fio.returncode != 0 or not out.exists() or not out.stat().st_size:
        agent_log = runtime.run_dir(env.lab_dir, "onprem", MACHINE) / "export.log"
        raise BenchError(
            f"fio failed ({fio.returncode}): {err.decode(errors='replace')[-800:]}\n"
            f"agent log ({agent_log}):\n{agent_log.read_text(errors='replace')[-3000:]}"
        )
    job = json.loads(out.read_text())["jobs"][0]
    level.achieved_mb = float(job["write"]["bw_bytes"]) / MB
    level.catch_up = wait_caught_up(sampler, level)
    # Every interval that ended during the level (the first one began before it: points keep coming
    # while the guest writes, between levels too).
    times = sampler.point_times()
    level.intervals = [b - a for a, b in itertools.pairwise(times) if started <= b <= ended]


def run(seconds: int, rates: list[int], disk_size: int, work: Path) -> list[Level]:
    env = Environment(work / "env", disk_size=disk_size)
    levels = [Level(rate, seconds) for rate in rates]
    try:
        env.start()
        enable_replication(env)
        sampler = Sampler(env)
        try:
            for level in levels:
                print(f"churn {level.rate_mb} MB/s for {seconds} s ...", flush=True)
                run_level(env, sampler, level, disk_size, work)
        finally:
            sampler.close()
    finally:
        env.stop()
    return levels


# ---- the report ----------------------------------------------------------------------------------


def machine() -> str:
    lines = Path("/proc/cpuinfo").read_text().splitlines()
    cpu = next(
        (ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), platform.processor()
    )
    fio = subprocess.run(["fio", "--version"], capture_output=True, text=True).stdout.strip()
    return (
        f"- `{' '.join(platform.uname())}`\n- CPU: {cpu}, {os.cpu_count()} cores\n"
        f"- Python {platform.python_version()}, {fio}"
    )


def report(levels: list[Level], seconds: int, disk_size: int) -> str:
    rpo = [
        "| churn target MB/s | achieved MB/s (fio) | RPO, server p50 / p99 / max s "
        "| RPO, data plane p50 / p99 / max s | newest point age p50 / p99 / max s "
        "| point interval median / max s | catch-up after churn s | samples |",
        "|---:|---:|---|---|---|---|---:|---:|",
    ]
    for lv in levels:
        interval = f"{percentile(lv.intervals, 50):.2f} / {max(lv.intervals):.2f}" if lv.intervals else "-"
        rpo.append(
            f"| {lv.rate_mb} | {lv.achieved_mb:.1f} | {triple(lv.rpo)} | {triple(lv.data_plane)} "
            f"| {triple(lv.point_age)} | {interval} | {lv.catch_up:.1f} | {len(lv.rpo)} |"
        )
    res = [
        "| churn target MB/s | PS backlog max MiB | agent spool max MiB "
        "| RSS max MiB agent / PS / MT / server | CPU % agent / PS / MT / server "
        "| device writes MB/s | load average (1 min) |",
        "|---:|---:|---:|---|---|---:|---:|",
    ]
    for lv in levels:
        rss = " / ".join(f"{lv.rss_max.get(n, 0) / MiB:.0f}" for n in WATCHED)
        cpu = " / ".join(f"{lv.cpu_percent.get(n, 0):.0f}" for n in WATCHED)
        res.append(
            f"| {lv.rate_mb} | {lv.backlog_max / MiB:.1f} | {lv.spool_max / MiB:.1f} | {rss} | {cpu} "
            f"| {lv.device_mb_s:.0f} | {lv.load:.1f} |"
        )
    return "\n".join(
        [
            "# RPO under sustained write churn",
            "",
            f"`{MACHINE}` on a {disk_size / GiB:.0f} GiB sparse disk replicated agent → ps-onprem → mt-cloud "
            "(mutual TLS, loopback), each a real process started by `siterecovery.demo.environment`. "
            f"fio `--ioengine=nbd` 64 KiB random writes (incompressible, iodepth 4) at the target rate for "
            f"{seconds} s per level through the agent's NBD export, plus the guest's log (~0.26 MB/s). "
            f"Sampled every {SAMPLE_EVERY} s. p99 over this few samples is close to the maximum. "
            "Target (DESIGN.md): a point every ≤ 5 s and p99 RPO ≤ 5 s at 20 MB/s per disk. MB = 10^6 bytes.",
            "",
            "- *RPO, server*: the item's `rpo_seconds` (the configuration server's monitor, every 1 s).",
            "- *RPO, data plane*: at each master-target report, the time since the newest agent report "
            "whose `captured_seq` the master target's `applied_seq` covers (an upper bound; heartbeats "
            "every 0.5 s).",
            "- *newest point age*: now - time of the newest recovery point the master target holds.",
            "- CPU % is of one core, over the churn time. *device writes*: what the block device under "
            "the work folder took during the level (agent spool + image, PS cache, MT journal + disk, "
            "and anything else on that device). The load average shows how busy the shared machine was.",
            "",
            *rpo,
            "",
            *res,
            "",
            "Machine:",
            "",
            machine(),
            "",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    scale = float(os.environ.get("SITERECOVERY_BENCH_SCALE", "1.0"))
    default_seconds = int(os.environ.get("SITERECOVERY_BENCH_SECONDS") or max(5, round(20 * scale)))
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--seconds", type=int, default=default_seconds, help="churn time per level")
    ap.add_argument("--rates", default="5,20,50", help="churn levels in MB/s, comma-separated")
    ap.add_argument("--disk-gib", type=int, default=2, help="size of the protected (sparse) disk")
    ap.add_argument("--keep", action="store_true", help="keep the work folder (lab, logs) for a post-mortem")
    args = ap.parse_args(argv)
    if shutil.which("fio") is None:
        print("fio is required (`make system-deps` installs it)", file=sys.stderr)
        return 2
    engines = subprocess.run(["fio", "--enghelp"], capture_output=True, text=True).stdout
    if "nbd" not in engines.split():
        print("this fio has no nbd ioengine (Debian's fio 3.33+ has it)", file=sys.stderr)
        return 2
    rates = [int(r) for r in args.rates.split(",") if r.strip()]
    disk_size = args.disk_gib * GiB
    base = os.environ.get("SITERECOVERY_BENCH_DIR") or os.environ.get("BENCH_TMP") or "/var/tmp"
    work = Path(tempfile.mkdtemp(prefix="bench-rpo-", dir=base))
    try:
        levels = run(args.seconds, rates, disk_size, work)
    finally:
        if args.keep:
            print(f"work folder kept: {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    text = report(levels, args.seconds, disk_size)
    print(text)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
