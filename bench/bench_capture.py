"""Write-capture benchmark: the agent's NBD export with a spooling sink against `qemu-nbd`.

The same `fio --ioengine=nbd` jobs (1 MiB sequential writes and 4 KiB random writes, queue depth 32)
run against `qemu-nbd -f raw` serving one 1 GiB image and against our export serving a copy of it,
with a sink that appends every captured write to a spool file (a bounded ring, as the real spool
trims what was acknowledged downstream). Prints a table of MiB/s and IOPS with the ratios and writes
it to `bench/results/capture.md` with the machine's description. Target (DESIGN.md): >= 1.0x the
peer's throughput and >= 0.8x its IOPS. Run with `python -m bench.bench_capture [--seconds N]`.
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

from siterecovery.dataplane.nbd import Export, run_nbd_server_in_thread

IMAGE_SIZE = 1 << 30
SPOOL_RING = 1 << 30
RESULTS = Path(__file__).resolve().parent / "results" / "capture.md"
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
    args = parser.parse_args()
    for tool in ("fio", "qemu-nbd"):
        if shutil.which(tool) is None:
            print(f"{tool} is required (make system-deps installs it)", file=sys.stderr)
            return 2
    rows: list[tuple[Job, Result, Result]] = []
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
        try:
            wait_for_socket(peer_sock, peer)
            for job in JOBS:
                # Alternate the two servers and keep medians: the machine is shared, and load from
                # elsewhere would otherwise land on whichever server happened to run during it.
                theirs, mine = [], []
                for _ in range(args.rounds):
                    theirs.append(run_fio(f"nbd+unix:///disk?socket={peer_sock}", job, args.seconds))
                    mine.append(run_fio(f"nbd+unix:///disk?socket={our_sock}", job, args.seconds))
                rows.append((job, median(theirs), median(mine)))
        finally:
            ours.stop()
            sink.close()
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
