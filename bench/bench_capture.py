"""Write-capture benchmark: the agent's NBD export with a spooling sink against `qemu-nbd`.

The same `fio --ioengine=nbd` jobs (1 MiB sequential writes and 4 KiB random writes, queue depth 32)
run against `qemu-nbd -f raw` serving one 1 GiB image and against our export serving a copy of it,
with a sink that appends every captured write to a spool file (a bounded ring, as the real spool
trims what was acknowledged downstream). Prints a table of MiB/s and IOPS with the ratios and writes
it to `bench/results/capture.md` with the machine's description. Target (DESIGN.md): >= 1.0x the
peer's throughput and >= 0.8x its IOPS. A third server (our export with the agent's write-intent
log in front of the image; `--no-activity-log` leaves it out) runs in the same alternation, and its figures
go to `bench/results/capture-activity-log.md`. Run with `python -m bench.bench_capture [--seconds N]`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from siterecovery.dataplane.activity_log import ActivityLog
from siterecovery.dataplane.nbd import Export, run_nbd_server_in_thread

IMAGE_SIZE = 1 << 30
SPOOL_RING = 1 << 30
RESULTS = Path(__file__).resolve().parent / "results" / "capture.md"
RESULTS_AL = Path(__file__).resolve().parent / "results" / "capture-activity-log.md"
_RECORD = struct.Struct(">QQI")


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

    def close(self) -> None:
        os.close(self._fd)


@dataclass(frozen=True)
class Job:
    name: str
    rw: str
    bs: str


JOBS = (
    Job("1 MiB sequential write, QD32", "write", "1M"),
    Job("4 KiB random write, QD32", "randwrite", "4k"),
)


@dataclass(frozen=True)
class Result:
    mib_s: float
    iops: float


def run_fio(uri: str, job: Job, seconds: int) -> Result:
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=5, help="run time of each fio job")
    parser.add_argument("--rounds", type=int, default=3, help="alternating runs per job; medians are kept")
    parser.add_argument(
        "--activity-log",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also our export with the write-intent log (a third server)",
    )
    args = parser.parse_args()
    for tool in ("fio", "qemu-nbd"):
        if shutil.which(tool) is None:
            print(f"{tool} is required (make system-deps installs it)", file=sys.stderr)
            return 2
    load_start = os.getloadavg()[0]
    rows: list[tuple[Job, Result, Result]] = []
    al_rows: list[tuple[Job, Result, Result]] = []
    intent: ActivityLog | None = None
    with tempfile.TemporaryDirectory(prefix="bench-capture-") as tmp:
        work = Path(tmp)
        peer_image, our_image = work / "peer.img", work / "ours.img"
        with open(peer_image, "wb") as f:
            f.truncate(IMAGE_SIZE)
        shutil.copyfile(peer_image, our_image)
        peer_sock, our_sock = work / "peer.sock", work / "ours.sock"
        peer = subprocess.Popen(
            [
                "qemu-nbd",
                "-f",
                "raw",
                "-x",
                "disk",
                "-t",
                "-e",
                "8",
                f"--socket={peer_sock}",
                str(peer_image),
            ],
        )
        sink = SpoolSink(work / "spool.bin")
        ours = run_nbd_server_in_thread([Export.for_image("disk", our_image, sink)], unix=our_sock)
        al_sock = work / "al.sock"
        al_sink = al_server = None
        if args.activity_log:
            al_image = work / "al.img"
            shutil.copyfile(peer_image, al_image)
            al_sink = SpoolSink(work / "al-spool.bin")
            intent = ActivityLog(work / "disk.al", IMAGE_SIZE)
            al_server = run_nbd_server_in_thread(
                [Export.for_image("disk", al_image, al_sink, intent=intent)], unix=al_sock
            )
        try:
            wait_for_socket(peer_sock, peer)
            for job in JOBS:
                # Alternate the servers and keep medians: the machine is shared, and load from
                # elsewhere would otherwise land on whichever server happened to run during it.
                # The order rotates from round to round: a server that always ran last would
                # always meet the page cache's writeback of the others' data.
                peer_runs: list[Result] = []
                our_runs: list[Result] = []
                al_runs: list[Result] = []
                servers = [(peer_sock, peer_runs), (our_sock, our_runs)]
                if al_server is not None:
                    servers.append((al_sock, al_runs))
                for r in range(args.rounds):
                    for sock, results in servers[r % len(servers) :] + servers[: r % len(servers)]:
                        results.append(run_fio(f"nbd+unix:///disk?socket={sock}", job, args.seconds))
                rows.append((job, median(peer_runs), median(our_runs)))
                if al_runs:
                    al_rows.append((job, median(our_runs), median(al_runs)))
        finally:
            ours.stop()
            sink.close()
            if al_server is not None and al_sink is not None:
                al_server.stop()
                al_sink.close()
            peer.terminate()
            peer.wait(timeout=30)
    table = [
        "| fio job | qemu-nbd MiB/s | export+spool MiB/s | throughput ratio | qemu-nbd IOPS "
        "| export+spool IOPS | IOPS ratio |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for job, theirs, mine in rows:
        table.append(
            f"| {job.name} | {theirs.mib_s:.0f} | {mine.mib_s:.0f} | {mine.mib_s / theirs.mib_s:.2f}x "
            f"| {theirs.iops:.0f} | {mine.iops:.0f} | {mine.iops / theirs.iops:.2f}x |"
        )
    report = "\n".join(
        [
            "# Write capture: agent NBD export + spool vs qemu-nbd",
            "",
            f"`fio --ioengine=nbd`, iodepth 32, {args.seconds} s per job after 1 s ramp, 1 GiB raw image, "
            f"Unix socket; median of {args.rounds} alternating runs per server. "
            "Target: >= 1.0x throughput, >= 0.8x IOPS.",
            "",
            *table,
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
    if al_rows:
        commits = intent.commits if intent is not None else 0
        loads = (load_start, os.getloadavg()[0])
        al_report = activity_log_report(al_rows, args.seconds, args.rounds, commits, loads)
        print(al_report)
        RESULTS_AL.write_text(al_report)
    return 0


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
