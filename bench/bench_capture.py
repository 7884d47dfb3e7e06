"""Write-capture benchmark: a protected disk's NBD export, replication running, against `qemu-nbd`.

The product's path: the mobility agent runs as a process serving a 1 GiB disk over NBD (Unix
socket) with its capture switch, spool, write-intent log (on, as deployed) and sender, replicating
over mutual TLS into a process server and a master target, both real processes on this machine
(`bench.plane.protected_disk`). `qemu-nbd -f raw -t -e 8` serves a copy of the image; the same
`fio --ioengine=nbd` jobs run against both, alternating in a rotating order, medians kept:

- **burst** (`--seconds`, default 10): 1 MiB sequential and 4 KiB random writes at queue depth 32,
  unthrottled. For the agent's runs it also records the spool's peak and the catch-up time (until
  the master target has applied everything captured) after fio stopped;
- **sustained** (`--sustained`, default 60): 1 MiB sequential writes at queue depth 32 held to
  `--rate-mb` MB/s, the data-plane RPO sampled every 0.25 s while it runs (the age of the oldest
  captured write the master target has not applied yet).

The agent runs with the product's heartbeat interval (`AGENT_INTERVAL`, 10 s): its stats loop
(building, writing and re-reading JSON) runs in the export's process, and at the 0.05 s the other
benches use it took ~30 % of that process's GIL samples during a 4 KiB burst. So the pair is watched
without asking the agent: what it captured and how long its sender held frames back come from the
spool's shared tail (`spool_tail.py`, mapped read-only here), the spool's size from its segment
files, what was applied from the master target's stats file (0.05 s; another process). The report
gives the sender's hold per burst, the catch-up, the export's CPU during fio apart from the catch-up,
and qemu-nbd's CPU per GiB beside its usual figure: a ratio against a slowed peer is flagged.

A separate row, labelled as such, keeps the old figure: the same NBD server code in this process
with a sink that only appends to a file (no agent, no sender, no replication). A fourth server adds
the write-intent log in front of that sink (`--no-activity-log` leaves it out); its ratio goes to
`bench/results/capture-activity-log.md`. Results and the load average go to
`bench/results/capture.md`. Targets (issue 16): burst >= 0.8x qemu-nbd's throughput and >= 0.5x its
IOPS with replication running; sustained >= 100 MB/s with p99 RPO <= 5 s.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.plane import Protected, protected_disk, stats, wait_until
from siterecovery.config import AGENT_INTERVAL
from siterecovery.dataplane.activity_log import ActivityLog
from siterecovery.dataplane.nbd.image import Export
from siterecovery.dataplane.nbd.server import run_nbd_server_in_thread
from siterecovery.dataplane.sender import HOLD_MAX
from siterecovery.dataplane.spool_tail import SpoolTail
from siterecovery.pki import CertificateAuthority

IMAGE_SIZE = 1 << 30
# The agent's spool limit by default: a 10 s burst of 1 MiB writes at up to 1.6 GB/s fits, so the
# burst measures the spool absorbing it (issue 16), not the dirty-block bitmap the agent falls back
# to past its limit (the product's default limit, 1 GiB, is ~1 s of such a burst: run with
# `--spool-limit-gib 1` to see that). The bench's temporary directory needs this much free space.
BURST_SPOOL_GIB = 16
SPOOL_RING = 1 << 30
RESULTS = Path(__file__).resolve().parent / "results" / "capture.md"
RESULTS_AL = Path(__file__).resolve().parent / "results" / "capture-activity-log.md"
_RECORD = struct.Struct(">QQI")
# A round whose qemu-nbd spent more than SLOWED times its median CPU per GiB of this run's rounds of
# the same job is a slowed peer: that round's ratio is flagged (the calibration is measured in the
# run, not taken from an earlier session's best).
SLOWED = 1.5


class SpoolSink:
    """Appends `(seq, offset, length)` + payload for every captured write to one file.

    One `pwritev` per record puts header and payload down in a single syscall, without joining them.
    """

    def __init__(self, path: Path) -> None:
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        self._seq = 0
        self._pos = 0

    def record_write(self, offset: int, data: memoryview) -> int:
        self._seq += 1
        if self._pos >= SPOOL_RING:
            self._pos = 0
        self._pos += os.pwritev(self._fd, [_RECORD.pack(self._seq, offset, len(data)), data], self._pos)
        return self._seq

    def record_zero(self, offset: int, length: int) -> int:
        self._seq += 1
        self._pos += os.pwrite(self._fd, _RECORD.pack(self._seq, offset, length), self._pos)
        return self._seq

    def flush(self) -> None:
        os.fdatasync(self._fd)

    def reset(self) -> None:
        """Start the ring again in an empty file: every run meets the same file state (the 1 MiB
        job's large folios, or pages evicted under unaligned 4 KiB records, would not)."""
        os.ftruncate(self._fd, 0)
        os.posix_fadvise(self._fd, 0, 0, os.POSIX_FADV_DONTNEED)
        self._pos = 0

    def close(self) -> None:
        os.close(self._fd)


@dataclass(frozen=True)
class Job:
    name: str
    rw: str
    bs: str
    rate: int = 0  # bytes/s, 0 = unthrottled


JOBS = (
    Job("1 MiB sequential write, QD32", "write", "1M"),
    Job("4 KiB random write, QD32", "randwrite", "4k"),
)


@dataclass(frozen=True)
class Result:
    mib_s: float
    iops: float


def run_fio(uri: str, job: Job, seconds: int) -> Result:
    rate = [f"--rate={job.rate}"] if job.rate else []
    out = subprocess.run(
        [
            "fio",
            "--name=capture",
            "--ioengine=nbd",
            f"--uri={uri}",
            f"--rw={job.rw}",
            f"--bs={job.bs}",
            "--iodepth=32",
            f"--size={IMAGE_SIZE}",
            f"--runtime={seconds}",
            "--time_based",
            "--ramp_time=1",
            *rate,
            "--output-format=json",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    write = json.loads(out[out.index("{") :])["jobs"][0]["write"]
    return Result(write["bw_bytes"] / (1 << 20), write["iops"])


def median(results: list[Result]) -> Result:
    return Result(statistics.median(r.mib_s for r in results), statistics.median(r.iops for r in results))


def evict(images: list[Path]) -> None:
    """Write the images' dirty pages out and drop them from the page cache.

    Every burst run starts from the same cache state, whichever job ran before: on this kernel
    (6.18, ext4 with large folios) a 4 KiB `pwrite` into a range cached by 1 MiB writes cost 13.2 us
    of CPU against 1.8 us once the range was evicted (3.2 us into a sparse file) — the kernel walks
    every block of the large folio. Left in place, the 1 MiB job's folios made the 4 KiB job of
    whichever server met them several times dearer (qemu-nbd at 19.3 CPU-s per GiB in session 8).
    First every dirty page of the machine is written out (`sync`): the catch-up after an agent run
    writes ~12 GiB through the process server's cache and the replica, and its writeback would
    otherwise go on into the next run, whichever server that is. (The sink rows' spool files are
    emptied by `SpoolSink.reset` instead: evicted, their unaligned 4 KiB records would each read a
    page back from the disk first.)
    """
    os.sync()
    for image in images:
        if not image.exists():
            continue
        fd = os.open(image, os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def wait_for_socket(path: Path, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 30
    while not path.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"qemu-nbd did not start (exit {proc.returncode})")
        time.sleep(0.05)


def machine() -> str:
    lines = Path("/proc/cpuinfo").read_text().splitlines()
    cpu = next(
        (ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), platform.processor()
    )
    uname = subprocess.run(["uname", "-a"], capture_output=True, text=True).stdout.strip()
    return f"- `{uname}`\n- CPU: {cpu}, {os.cpu_count()} cores\n- Python {platform.python_version()}"


@dataclass(frozen=True)
class Look:
    """One look at the pair, taken without asking the agent (see the module docstring)."""

    at: float  # time.monotonic() of the look
    captured_seq: int  # the newest sequence the agent allocated (the spool's shared tail)
    applied_seq: int  # what the master target has made durable (its stats file, every 0.05 s)
    spool_bytes: int  # the spool's segment files
    held: float  # seconds the sender has held frames back in all (the tail)


class PairWatcher:
    """Looks at pair "p" of a protected disk: the agent's tail and spool files, the MT's stats."""

    def __init__(self, disk: Protected) -> None:
        pair = disk.root / "agent" / "pairs" / "p"
        self._tail = SpoolTail(pair / "spool.tail")
        self._spool = pair / "spool"
        self._mt = disk.root / "mt"
        self._state = pair / "state.json"

    def past_limit(self) -> bool:
        """The pair tracks writes as dirty blocks (its spool went past its limit)."""
        try:
            return bool(json.loads(self._state.read_text()).get("dirty_mode"))
        except (OSError, ValueError):
            return False

    def look(self) -> Look | None:
        mt = stats(self._mt).get("pairs") or []
        if not mt:
            return None
        spool = 0
        with contextlib.suppress(FileNotFoundError):
            for entry in os.scandir(self._spool):
                with contextlib.suppress(FileNotFoundError):
                    spool += entry.stat().st_size
        applied = int(mt[0]["applied_seq"])  # type: ignore[index]
        return Look(time.monotonic(), self._tail.captured, applied, spool, self._tail.held)

    def caught_up(self) -> bool:
        s = self.look()
        return s is not None and s.applied_seq >= s.captured_seq

    def close(self) -> None:
        self._tail.close()


@dataclass
class Watch:
    """What the protected pair did while fio ran against the agent (sampled every 0.25 s)."""

    samples: list[Look] = field(default_factory=list)
    spool_max: int = 0
    catch_up: list[float] = field(default_factory=list)  # s from fio's end until all was applied
    held: list[float] = field(default_factory=list)  # s the sender held frames back, per run
    # per run: seconds into the run when the pair went past the spool's limit (writes tracked as
    # dirty blocks from then on, not spooled as frames: the rest of the run measured the bitmap, not
    # the spool), None when it stayed within. Sampled while fio runs: the dirty-block sync that
    # follows clears the mark before the catch-up ends.
    past_limit: list[float | None] = field(default_factory=list)

    def rpo(self) -> list[float]:
        """Per sample, the age of the oldest captured write not yet applied by the master target:
        the time since the newest earlier look whose captured writes are all applied now (0 when
        nothing is outstanding). Resolution: the MT's 0.05 s stats interval + 0.25 s sampling."""
        ages = []
        for i, s in enumerate(self.samples):
            if s.applied_seq >= s.captured_seq:
                ages.append(0.0)
                continue
            covered = [e.at for e in self.samples[:i] if e.captured_seq <= s.applied_seq]
            if covered:
                ages.append(s.at - covered[-1])
        return ages


def watched(
    disk: Protected, watcher: PairWatcher, watch: Watch, job: Job, seconds: int
) -> tuple[Result, float]:
    """fio against the agent's export, sampling the pair meanwhile, then wait for the catch-up;
    also the export's CPU seconds while fio ran."""
    stop = threading.Event()
    held0 = watcher.look()
    export_cpu = cpu_seconds(disk.pids["agent"])

    started = time.monotonic()
    past_at: list[float] = []

    def sample() -> None:
        while not stop.wait(0.25):
            s = watcher.look()
            if s is not None:
                watch.samples.append(s)
                watch.spool_max = max(watch.spool_max, s.spool_bytes)
            if not past_at and watcher.past_limit():
                past_at.append(time.monotonic() - started)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        result = run_fio(f"nbd+unix:///d?socket={disk.sock}", job, seconds)
    finally:
        stop.set()
        sampler.join()
    ended = time.monotonic()
    export_cpu = cpu_seconds(disk.pids["agent"]) - export_cpu
    wait_until(watcher.caught_up, 1800)
    watch.catch_up.append(time.monotonic() - ended)
    held1 = watcher.look()
    if held0 is not None and held1 is not None:
        watch.held.append(held1.held - held0.held)
    watch.past_limit.append(past_at[0] if past_at else None)
    return result, export_cpu


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a live process, from /proc (0 once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def agent_pids(disk: Protected) -> dict[str, int]:
    """The agent's export process, its pair's sender child, the process server, the master target."""
    pids = {"agent export": disk.pids["agent"], "process server": disk.pids["ps"]}
    pids["master target"] = disk.pids["mt"]
    with contextlib.suppress(OSError, ValueError):
        pids["sender"] = int((disk.root / "agent" / "pairs" / "p" / "sender.pid").read_text())
    return pids


@dataclass
class Run:
    # (job, server) -> per run, CPU seconds per GiB written by process (fio's start to catch-up)
    cpu: dict[tuple[str, str], list[dict[str, float]]] = field(default_factory=dict)
    burst: list[tuple[Job, dict[str, Result]]] = field(default_factory=list)
    # job -> server -> the result of each round, in round order (a round runs every server once)
    rounds: dict[str, dict[str, list[Result]]] = field(default_factory=dict)
    burst_watch: Watch = field(default_factory=Watch)
    sustained: dict[str, Result] = field(default_factory=dict)
    sustained_watch: Watch = field(default_factory=Watch)
    commits: int = 0


PEER, AGENT, SINK, SINK_AL = "qemu-nbd", "agent", "sink only", "sink only + write-intent log"
_DURING = "agent export while fio ran"
_CPU_COLUMNS = ("qemu-nbd", "agent export", "sender", "process server", "master target")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=10, help="run time of each burst fio job")
    parser.add_argument("--sustained", type=int, default=60, help="run time of the sustained job (0: skip)")
    parser.add_argument("--rate-mb", type=int, default=100, help="the sustained job's rate, MB/s (10^6 B)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating runs per job; medians are kept")
    parser.add_argument(
        "--activity-log",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also the sink-only export with the write-intent log (a fourth server)",
    )
    parser.add_argument(
        "--spool-limit-gib",
        type=float,
        default=BURST_SPOOL_GIB,
        help=(
            f"the agent's spool limit (default {BURST_SPOOL_GIB} GiB: sized to a 10 s burst; the "
            "product's default is 1 GiB); past it writes go on as dirty blocks"
        ),
    )
    args = parser.parse_args()
    for tool in ("fio", "qemu-nbd"):
        if shutil.which(tool) is None:
            print(f"{tool} is required (make system-deps installs it)", file=sys.stderr)
            return 2
    loads = [os.getloadavg()[0]]
    run = Run()
    tmp_root = os.environ.get("BENCH_TMP", "/var/tmp")
    free_gib = shutil.disk_usage(tmp_root).free / (1 << 30)
    if free_gib < args.spool_limit_gib + 8:
        print(
            f"{tmp_root} has {free_gib:.0f} GiB free: the spool limit ({args.spool_limit_gib:g} GiB) and "
            "the images need 8 GiB more (set BENCH_TMP, or lower --spool-limit-gib)",
            file=sys.stderr,
        )
        return 2
    with tempfile.TemporaryDirectory(prefix="bench-capture-", dir=tmp_root) as tmp:
        work = Path(tmp)
        measure(work, args, run)
    loads.append(os.getloadavg()[0])
    report = capture_report(run, args, loads)
    print(report)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(report)
    al_rows = [(job, r[SINK], r[SINK_AL]) for job, r in run.burst if SINK_AL in r]
    if al_rows:
        al_report = activity_log_report(
            al_rows, args.seconds, args.rounds, run.commits, (loads[0], loads[-1])
        )
        print(al_report)
        RESULTS_AL.write_text(al_report)
    return 0


def measure(work: Path, args: argparse.Namespace, run: Run) -> None:
    images = {name: work / f"{name}.img" for name in ("peer", "agent", "sink", "al", "target")}
    for image in images.values():
        with open(image, "wb") as f:
            f.truncate(IMAGE_SIZE)
    peer_sock, sink_sock, al_sock = work / "peer.sock", work / "sink.sock", work / "al.sock"
    peer = subprocess.Popen(
        ["qemu-nbd", "-f", "raw", "-x", "disk", "-t", "-e", "8", f"--socket={peer_sock}", str(images["peer"])]
    )
    ca = CertificateAuthority.load_or_create(work / "ca")
    sink = SpoolSink(work / "spool.bin")
    sink_server = run_nbd_server_in_thread([Export.for_image("disk", images["sink"], sink)], unix=sink_sock)
    al_sink = al_server = intent = None
    if args.activity_log:
        al_sink = SpoolSink(work / "al-spool.bin")
        intent = ActivityLog(work / "disk.al", IMAGE_SIZE)
        al_server = run_nbd_server_in_thread(
            [Export.for_image("disk", images["al"], al_sink, intent=intent)], unix=al_sock
        )
    try:
        wait_for_socket(peer_sock, peer)
        with (
            protected_disk(
                work / "plane",
                ca,
                images["agent"],
                images["target"],
                IMAGE_SIZE,
                agent_interval=AGENT_INTERVAL,
                spool_limit=int(args.spool_limit_gib * (1 << 30)),
            ) as disk,
            contextlib.closing(PairWatcher(disk)) as watcher,
        ):

            def fio(name: str, job: Job, seconds: int, watch: Watch) -> Result:
                # CPU time per GiB beside the wall-clock rate: on a shared machine it is the steadier
                # figure. Agent: from fio's start until the master target applied everything.
                pids = agent_pids(disk) if name == AGENT else {"qemu-nbd": peer.pid} if name == PEER else {}
                evict(list(images.values()))
                for spool in (sink, al_sink):
                    if spool is not None:
                        spool.reset()
                before = {k: cpu_seconds(p) for k, p in pids.items()}
                during = 0.0
                if name == AGENT:
                    result, during = watched(disk, watcher, watch, job, seconds)
                else:
                    sock = {PEER: peer_sock, SINK: sink_sock, SINK_AL: al_sock}[name]
                    result = run_fio(f"nbd+unix:///disk?socket={sock}", job, seconds)
                gib = result.mib_s * (seconds + 1) / 1024  # the run and its 1 s ramp, at fio's rate
                if pids and gib > 0:
                    spent = {k: (cpu_seconds(p) - before[k]) / gib for k, p in pids.items()}
                    if name == AGENT:
                        spent[_DURING] = during / gib
                    run.cpu.setdefault((job.name, name), []).append(spent)
                return result

            names = [PEER, AGENT, SINK] + ([SINK_AL] if al_server is not None else [])
            for job in JOBS:
                # Alternate the servers and keep medians: the machine is shared, and load from
                # elsewhere would otherwise land on whichever server happened to run during it.
                # The order rotates from round to round: a server that always ran last would
                # always meet the page cache's writeback of the others' data.
                runs: dict[str, list[Result]] = {n: [] for n in names}
                for r in range(args.rounds):
                    for name in names[r % len(names) :] + names[: r % len(names)]:
                        runs[name].append(fio(name, job, args.seconds, run.burst_watch))
                run.burst.append((job, {n: median(v) for n, v in runs.items()}))
                run.rounds[job.name] = runs
            if args.sustained:
                job = Job("1 MiB sequential write, QD32", "write", "1M", args.rate_mb * 1_000_000)
                for name in (AGENT, PEER):
                    run.sustained[name] = fio(name, job, args.sustained, run.sustained_watch)
    finally:
        sink_server.stop()
        sink.close()
        if al_server is not None and al_sink is not None:
            al_server.stop()
            al_sink.close()
        run.commits = intent.commits if intent is not None else 0
        peer.terminate()
        peer.wait(timeout=30)


def peer_cpu(run: Run, job_name: str) -> list[float]:
    """qemu-nbd's CPU seconds per GiB in each round of the job (in round order)."""
    return [r["qemu-nbd"] for r in run.cpu.get((job_name, PEER), [])]


def slowed_rounds(run: Run, job_name: str) -> list[int]:
    """The rounds (0-based) whose qemu-nbd spent more than SLOWED x the median of this run's rounds."""
    cpu = peer_cpu(run, job_name)
    if not cpu:
        return []
    usual = statistics.median(cpu)
    return [i for i, c in enumerate(cpu) if c > SLOWED * usual]


def round_ratios(run: Run, job_name: str, name: str) -> list[float]:
    """Per round, the server's IOPS over qemu-nbd's in the same round (they ran back to back)."""
    rounds = run.rounds.get(job_name, {})
    return [
        r.iops / p.iops for r, p in zip(rounds.get(name, []), rounds.get(PEER, []), strict=False) if p.iops
    ]


def capture_report(run: Run, args: argparse.Namespace, loads: list[float]) -> str:
    table = [
        "| fio job | server | MiB/s | IOPS | vs qemu-nbd (throughput / IOPS) |",
        "|---|---|---:|---:|---:|",
    ]
    for job, results in run.burst:
        peer = results[PEER]
        for name, label in (
            (PEER, "qemu-nbd -f raw -t -e 8"),
            (AGENT, "**agent export, replication running** (write-intent log on)"),
            (SINK, "sink only: NBD server code + spool file, no agent/replication (not the product)"),
            (SINK_AL, "sink only + write-intent log (not the product)"),
        ):
            if name in results:
                r = results[name]
                ratio = "—" if name == PEER else f"{r.mib_s / peer.mib_s:.2f}x / {r.iops / peer.iops:.2f}x"
                per_round = round_ratios(run, job.name, name)
                if per_round and name != PEER:
                    ratio += f"; rounds {' / '.join(f'{x:.2f}' for x in per_round)}"
                    ratio += f", median **{statistics.median(per_round):.2f}x**"
                    slowed = slowed_rounds(run, job.name)
                    if slowed:
                        ratio += f" (peer slowed in round {', '.join(str(i + 1) for i in slowed)})"
                table.append(f"| {job.name} | {label} | {r.mib_s:.0f} | {r.iops:.0f} | {ratio} |")
    columns = (*_CPU_COLUMNS[:2], _DURING, *_CPU_COLUMNS[2:])
    cpu_table = [
        "| fio job | server | " + " | ".join(columns) + " | total | qemu-nbd per round |",
        "|---|---|" + "---:|" * (len(columns) + 2),
    ]
    for (job_name, name), runs in run.cpu.items():
        med = {k: statistics.median(r.get(k, 0.0) for r in runs) for k in runs[0]}
        cells = [f"{med[k]:.2f}" if k in med else "—" for k in columns]
        total = sum(v for k, v in med.items() if k != _DURING)
        usual = "—"
        if name == PEER:
            slowed = slowed_rounds(run, job_name)
            usual = " / ".join(
                f"**{c:.2f}** (slowed)" if i in slowed else f"{c:.2f}"
                for i, c in enumerate(peer_cpu(run, job_name))
            )
        cpu_table.append(f"| {job_name} | {name} | " + " | ".join(cells) + f" | {total:.2f} | {usual} |")
    bw = run.burst_watch
    default = " (the product's default)" if args.spool_limit_gib == 1 else " (the product's default is 1 GiB)"
    limit_text = f"{args.spool_limit_gib:g} GiB{default}"
    held = ", ".join(f"{h:.1f}" for h in bw.held) or "—"
    past = ", ".join("within" if p is None else f"past after {p:.1f} s" for p in bw.past_limit) or "—"
    catch = ", ".join(f"{c:.1f}" for c in bw.catch_up) or "—"
    lines = [
        "# Write capture: a protected disk's NBD export with replication running, vs qemu-nbd",
        "",
        f"`fio --ioengine=nbd`, iodepth 32, 1 GiB raw images, Unix sockets. Burst: {args.seconds} s per "
        f"job after 1 s ramp, median of {args.rounds} runs per server, alternating in a rotating order. "
        "The agent is the real mobility-agent process (capture switch, spool, write-intent log on, "
        "sender) replicating over mutual TLS into a process server and a master target, real processes "
        "on the same machine. Targets (issue 16): burst >= 0.8x throughput and >= 0.5x IOPS of "
        "qemu-nbd; sustained >= 100 MB/s with p99 RPO <= 5 s.",
        "",
        "## Burst",
        "",
        *table,
        "",
        f"Agent spool peak during its burst runs: {bw.spool_max / (1 << 20):.0f} MiB; catch-up after "
        f"each run (fio's end until the master target had applied everything captured): "
        f"median {statistics.median(bw.catch_up) if bw.catch_up else float('nan'):.1f} s, "
        f"max {max(bw.catch_up, default=float('nan')):.1f} s.",
        "",
        f"Per agent burst run, in run order (1 MiB runs first): seconds the sender held spooled frames "
        f"back while the export was saturated (at most {HOLD_MAX:.0f} s at a stretch, `HOLD_MAX`): {held}; "
        f"catch-up s: {catch}. The agent's stats interval: {AGENT_INTERVAL:g} s (the product's). "
        f"The spool's limit ({limit_text}) during each run: {past} (past: from then on the pair tracked "
        "writes as dirty blocks instead of spooling frames, as the product does when its spool is full, "
        "so the rest of that run measured the bitmap, not the spool).",
        "",
        "Ratios: the medians' ratio, then each round's own (a round runs every server back to back, "
        "so its ratio meets the same machine) and their median, the verdict. Before every run each "
        "server's image is written out and dropped from the page cache (`evict`): the previous "
        "job's large folios would otherwise make 4 KiB writes several times dearer for whichever "
        "server meets them.",
        "",
        "CPU seconds (user + system, `/proc/PID/stat`) per GiB written, medians of the burst runs: "
        "for the agent from fio's start until the master target had applied everything (GiB: fio's "
        "rate x (run + 1 s ramp)); the export's own CPU while fio ran is also given apart (not in the "
        "total). Steadier than wall-clock rates on a shared machine. qemu-nbd's figure of every round "
        f"is given; a round above {SLOWED}x the median of this run's rounds is flagged as slowed (the "
        "calibration is this run's own peer, not an earlier session's).",
        "",
        *cpu_table,
        "",
    ]
    if run.sustained:
        sw = run.sustained_watch
        rpo = sw.rpo()
        rpo_cell = " / ".join(
            f"{v:.1f}" for v in (percentile(rpo, 0.5), percentile(rpo, 0.99), max(rpo, default=0))
        )
        a, p = run.sustained[AGENT], run.sustained[PEER]
        lines += [
            "## Sustained",
            "",
            f"1 MiB sequential writes, iodepth 32, held to {args.rate_mb} MB/s for {args.sustained} s "
            "(agent first, then qemu-nbd). Data-plane RPO: the age of the oldest captured write the "
            "master target had not applied yet, sampled every 0.25 s (the agent's tail, the master "
            "target's stats file).",
            "",
            "| server | MB/s reached | RPO p50 / p99 / max s | spool peak MiB | catch-up s |",
            "|---|---:|---:|---:|---:|",
            f"| agent, replication running | {a.mib_s * (1 << 20) / 1e6:.0f} | "
            f"{rpo_cell} "
            f"| {sw.spool_max / (1 << 20):.0f} | {sw.catch_up[0] if sw.catch_up else float('nan'):.1f} |",
            f"| qemu-nbd | {p.mib_s * (1 << 20) / 1e6:.0f} | — | — | — |",
            "",
        ]
    lines += [
        f"Load average (1 min) at the start and the end: {loads[0]:.1f}, {loads[-1]:.1f} on "
        f"{os.cpu_count()} cores. The machine is shared with other work: compare the rows of one run, "
        "not runs of different days.",
        "",
        "Machine:",
        "",
        machine(),
        "",
    ]
    return "\n".join(lines)


def activity_log_report(
    rows: list[tuple[Job, Result, Result]],
    seconds: int,
    rounds: int,
    commits: int,
    loads: tuple[float, float],
) -> str:
    table = [
        "| fio job | export+spool MiB/s | + write-intent log MiB/s | ratio | export+spool IOPS "
        "| + write-intent log IOPS | ratio |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for job, without, with_al in rows:
        ratio, iops_ratio = with_al.mib_s / without.mib_s, with_al.iops / without.iops
        table.append(
            f"| {job.name} | {without.mib_s:.0f} | {with_al.mib_s:.0f} | {ratio:.2f}x "
            f"| {without.iops:.0f} | {with_al.iops:.0f} | {iops_ratio:.2f}x |"
        )
    return "\n".join(
        [
            "# Write capture: the cost of the write-intent (activity) log",
            "",
            f"The same fio jobs as `capture.md` (iodepth 32, {seconds} s per job after 1 s ramp, 1 GiB raw "
            f"image, Unix socket; median of {rounds} runs per server, alternating with qemu-nbd and the "
            "export without the log), against our export with the agent's write-intent log (4 MiB "
            "extents, up to 1024 marked) in front of the image. The machine is shared with other work: "
            "compare the two columns of one run, not runs of different days. The server order rotates "
            "from round to round.",
            "",
            *table,
            "",
            f"Log writes (one fdatasync each) over the whole run: {commits}. Load average (1 min) of the "
            f"machine at the start and the end: {loads[0]:.1f}, {loads[1]:.1f} on {os.cpu_count()} cores.",
            "",
            "Machine:",
            "",
            machine(),
            "",
        ]
    )


if __name__ == "__main__":
    sys.exit(main())
