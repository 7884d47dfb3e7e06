"""Initial full replication: agent → process server → master target over mutual TLS, vs nbdcopy.

Our side: the three services run as separate processes on loopback; the agent fully copies an
image (2 GiB by default) to the master target through the process server's disk cache; the time
runs from enabling the pair (written into the running services' assignments; the agent's spare
sender child, started with the agent, takes it then) until the master target has durably applied
everything the agent sent. The services are started before the clock, as the peer's two `qemu-nbd`
servers are.
The peer: `nbdcopy` between two `qemu-nbd` exports over TLS (`nbds://`, x509 credentials from the
same CA) — the same bytes over two TLS connections too (source server → nbdcopy → destination
server), but no cache and no fsync; `nbdcopy --flush` (destination flushed at the end, durable as
ours) is timed beside it. Two datasets, each fed to both sides in the same run: random bytes (the
worst case for us: nothing to skip or compress; the target's row) and a mixed image (zeroes,
text-like and random MiB blocks). Rounds alternate the order; medians are reported, with CPU
seconds per GiB of every process. The verdict is the median of each round's own ratio (peer ÷
ours, the two measured back to back), which load drifting between rounds moves less than a ratio
of medians; every round's ratio is printed too, and each side's CPU seconds per GiB, which the
load barely moves. Also timed: an empty sparse 100 GiB disk (target ≤ 2 s). Prints a table and
writes `bench/results/replication.md`. Run with
`python -m bench.bench_replication [--size-mib N] [--rounds N] [--datasets random|mixed|all]`.
"""

from __future__ import annotations

import argparse
import functools
import os
import socket
import statistics
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.plane import MiB, cpu_seconds, free_port, report, sync_once, wait_until
from siterecovery.pki import CertificateAuthority

RESULTS = Path(__file__).resolve().parent / "results" / "replication.md"


def _write_random(path: Path, size: int) -> None:
    with open(path, "wb") as f:
        for _ in range(size // (64 * MiB)):
            f.write(os.urandom(64 * MiB))
        f.write(os.urandom(size % (64 * MiB)))


def _write_mixed(path: Path, size: int) -> None:
    """A more realistic disk than random bytes, MiB by MiB in turn: zeroes (allocated, not holes),
    text-like bytes (16 symbols: zstd level 1 halves them), and two MiB of random bytes."""
    text = bytes.maketrans(bytes(range(256)), bytes(b"etaoinshrdlu \n.,"[i % 16] for i in range(256)))
    with open(path, "wb") as f:
        for i in range(size // MiB):
            kind = i % 4
            block = os.urandom(MiB)
            f.write(bytes(MiB) if kind == 0 else block.translate(text) if kind == 1 else block)
        f.write(os.urandom(size % MiB))


MIXED = "25 % zero, 25 % text-like, 50 % random MiB blocks"


def replicate(
    root: Path,
    ca: CertificateAuthority,
    src: Path,
    size: int,
    cpu: dict[str, float] | None = None,
    startup: list[float] | None = None,
) -> tuple[float, int]:
    """Seconds for a full initial replication of `src`, and bytes the agent sent; `cpu`, if given,
    receives each process's CPU seconds, `startup` the seconds until the first byte was sent."""
    target = root / "target.img"
    target.unlink(missing_ok=True)
    return sync_once(root, ca, src, target, size, "full", cpu=cpu, services_running=True, startup=startup)


def nbdcopy_tls(
    root: Path,
    ca: CertificateAuthority,
    src: Path,
    size: int,
    cpu: dict[str, float] | None = None,
    *,
    flush: bool = False,
) -> float:
    """Seconds for nbdcopy between two qemu-nbd exports over TLS on loopback; `cpu`, if given,
    receives the CPU seconds of nbdcopy and of both qemu-nbd servers. With `flush`, nbdcopy
    flushes the destination at the end (without, the copy may still be in the page cache)."""
    server_dir, client_dir = root / "tls-server", root / "tls-client"
    for d, stem in ((server_dir, "server"), (client_dir, "client")):
        d.mkdir(exist_ok=True)
        issued = ca.issue(stem)
        (d / "ca-cert.pem").write_bytes(issued.ca_pem)
        (d / f"{stem}-cert.pem").write_bytes(issued.cert_pem)
        (d / f"{stem}-key.pem").write_bytes(issued.key_pem)
    dst = root / "nbd-target.img"
    with open(dst, "wb") as f:
        f.truncate(size)
    creds = f"tls-creds-x509,id=tls0,dir={server_dir},endpoint=server,verify-peer=on"
    procs = []
    ports = []
    for image, ro in ((src, ["--read-only"]), (dst, [])):
        port = free_port()
        ports.append(port)
        procs.append(
            subprocess.Popen(
                [
                    "qemu-nbd",
                    "-f",
                    "raw",
                    "-b",
                    "127.0.0.1",
                    "-p",
                    str(port),
                    "--object",
                    creds,
                    "--tls-creds",
                    "tls0",
                    "-t",
                    *ro,
                    str(image),
                ]
            )
        )
    try:
        for port in ports:  # both servers listen (a loaded box starts them slowly)
            wait_until(functools.partial(_listening, port), 60)
        uri = "nbds://localhost:{}/?tls-certificates=" + str(client_dir)
        before = [cpu_seconds(p.pid) for p in procs]  # as ours: what the servers used before is left out
        start = time.monotonic()
        flag = ["--flush"] if flush else []
        copy = subprocess.Popen(["nbdcopy", *flag, uri.format(ports[0]), uri.format(ports[1])])
        _pid, status, usage = os.wait4(copy.pid, 0)
        elapsed = time.monotonic() - start
        copy.returncode = os.waitstatus_to_exitcode(status)
        if copy.returncode:
            raise subprocess.CalledProcessError(copy.returncode, copy.args)
        if cpu is not None:
            cpu["nbdcopy"] = usage.ru_utime + usage.ru_stime
            cpu["qemu-nbd src"], cpu["qemu-nbd dst"] = (
                cpu_seconds(p.pid) - b for p, b in zip(procs, before, strict=True)
            )
    finally:
        for p in procs:
            p.kill()  # qemu-nbd with TLS can hang on SIGTERM while a client is connected
            p.wait()
    if subprocess.run(["qemu-img", "compare", "-q", "-f", "raw", "-F", "raw", str(src), str(dst)]).returncode:
        raise AssertionError("nbdcopy target differs from source")
    dst.unlink()
    return elapsed


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


@dataclass
class Runs:
    """Alternating runs of one dataset: seconds and CPU seconds per process, per round."""

    ours: list[float] = field(default_factory=list)
    peer: list[float] = field(default_factory=list)
    peer_flush: list[float] = field(default_factory=list)
    ours_startup: list[float] = field(default_factory=list)  # seconds until the agent's first byte
    ours_cpu: list[dict[str, float]] = field(default_factory=list)
    peer_cpu: list[dict[str, float]] = field(default_factory=list)
    sent: int = 0

    def run(self, root: Path, ca: CertificateAuthority, src: Path, size: int, rnd: int) -> None:
        steps = [self._ours, self._peer, self._peer_flush]
        for step in steps if rnd % 2 == 0 else steps[::-1]:  # alternating: load drifts
            step(root, ca, src, size)

    def _ours(self, root: Path, ca: CertificateAuthority, src: Path, size: int) -> None:
        cpu: dict[str, float] = {}
        startup: list[float] = []
        seconds, self.sent = replicate(root, ca, src, size, cpu, startup)
        self.ours.append(seconds)
        self.ours_startup.append(startup[0] if startup else 0.0)
        self.ours_cpu.append(cpu)

    def _peer(self, root: Path, ca: CertificateAuthority, src: Path, size: int) -> None:
        cpu: dict[str, float] = {}
        self.peer.append(nbdcopy_tls(root, ca, src, size, cpu))
        self.peer_cpu.append(cpu)

    def _peer_flush(self, root: Path, ca: CertificateAuthority, src: Path, size: int) -> None:
        self.peer_flush.append(nbdcopy_tls(root, ca, src, size, flush=True))


def _cpu_per_gib(samples: list[dict[str, float]], size: int) -> str:
    """Median CPU seconds per GiB of each process, and of all of them."""
    gib = size / (1 << 30)
    names = list(samples[0])
    parts = [f"{n} {statistics.median(s[n] for s in samples) / gib:.2f}" for n in names]
    total = statistics.median(sum(s.values()) for s in samples) / gib
    return ", ".join(parts) + f" = {total:.2f}"


def _paired(peer: list[float], ours: list[float]) -> str:
    """The median of each round's own ratio (peer ÷ ours), then every round's."""
    ratios = [p / o for p, o in zip(peer, ours, strict=True)]
    return f"{statistics.median(ratios):.2f}x (rounds: {', '.join(f'{r:.2f}' for r in ratios)})"


def _cpu_total(samples: list[dict[str, float]]) -> float:
    return statistics.median(sum(s.values()) for s in samples)


def _rows(label: str, mib: int, runs: Runs, size: int, target: str) -> list[tuple[str, ...]]:
    ours, peer, flushed = (statistics.median(x) for x in (runs.ours, runs.peer, runs.peer_flush))
    moving = statistics.median(o - s for o, s in zip(runs.ours, runs.ours_startup, strict=True))
    return [
        (
            f"full replication, {label}",
            f"{mib} MiB",
            f"{ours:.2f} s ({mib / ours:.0f} MiB/s)",
            f"{peer:.2f} s ({mib / peer:.0f} MiB/s)",
            _paired(runs.peer, runs.ours),
            target,
        ),
        (
            "the same, peer `nbdcopy --flush` (replica durable at the end, as ours)",
            f"{mib} MiB",
            f"{ours:.2f} s",
            f"{flushed:.2f} s ({mib / flushed:.0f} MiB/s)",
            _paired(runs.peer_flush, runs.ours),
            "-",
        ),
        (
            "the same, ours from the agent's first byte sent (its sender's session start left out)",
            f"{mib} MiB",
            f"{moving:.2f} s (start-up {statistics.median(runs.ours_startup):.2f} s)",
            f"{peer:.2f} s",
            _paired(runs.peer, [o - s for o, s in zip(runs.ours, runs.ours_startup, strict=True)]),
            "-",
        ),
        (
            f"CPU s/GiB (user+sys), {label}; ratio: peer's total ÷ ours",
            f"{mib} MiB",
            _cpu_per_gib(runs.ours_cpu, size),
            _cpu_per_gib(runs.peer_cpu, size),
            f"{_cpu_total(runs.peer_cpu) / _cpu_total(runs.ours_cpu):.2f}x",
            "-",
        ),
        (f"bytes sent by the agent, {label}", f"{mib} MiB", f"{runs.sent / MiB:.1f} MiB", "-", "-", "-"),
    ]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--size-mib", type=int, default=2048)
    ap.add_argument("--empty-gib", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds per dataset (medians)")
    ap.add_argument("--datasets", choices=["random", "mixed", "all"], default="all")
    args = ap.parse_args(argv)
    size = args.size_mib * MiB
    datasets = {"random image": _write_random, f"mixed image ({MIXED})": _write_mixed}
    if args.datasets != "all":
        datasets = {k: v for k, v in datasets.items() if k.startswith(args.datasets)}
    results: dict[str, Runs] = {}
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP", "/var/tmp")) as tmp:
        root = Path(tmp)
        ca = CertificateAuthority.load_or_create(root / "ca")
        src = root / "src.img"
        for label, write in datasets.items():
            write(src, size)
            runs = results[label] = Runs()
            for rnd in range(args.rounds):
                runs.run(root, ca, src, size, rnd)
            src.unlink()
        empty = root / "empty.img"
        with open(empty, "wb") as f:
            f.truncate(args.empty_gib << 30)
        empty_s, empty_sent = replicate(root, ca, empty, args.empty_gib << 30)
    rows: list[tuple[str, ...]] = []
    for label, runs in results.items():
        rows += _rows(label, args.size_mib, runs, size, ">= 1.0x" if label == "random image" else "-")
    rows.append(
        (
            f"empty sparse {args.empty_gib} GiB disk",
            f"{args.empty_gib} GiB",
            f"{empty_s:.2f} s, {empty_sent} B sent",
            "-",
            "-",
            "<= 2 s",
        )
    )
    header = [
        "case",
        "size",
        "siterecovery (agent→PS→MT, mTLS)",
        "nbdcopy qemu-nbd→qemu-nbd (TLS)",
        "throughput ratio (median of rounds' own)",
        "target",
    ]
    report(
        RESULTS,
        "Initial full replication",
        header,
        rows,
        f"Medians of {args.rounds} alternating rounds per dataset (ours, `nbdcopy`, `nbdcopy --flush`, the"
        " order reversed every other round); each dataset is fed to both sides in the same run. How to"
        " read it: the verdict is the throughput ratio, the median of each round's own ratio (peer's"
        " time ÷ ours, measured back to back, so load drifting between rounds cancels out); the"
        " rounds' ratios follow it — when they straddle the target, the run does not decide. The CPU"
        " row (user+sys seconds per GiB, each process and the total) is what load barely moves: a"
        " change on either side shows there first. Time"
        " runs from enabling the pair in the running services (started before the clock, as the"
        " peer's qemu-nbd servers are; the agent's spare sender child, started with the agent, takes the"
        " pair inside it). The master target"
        " also keeps the replica's"
        " block digests as it applies (`target_digests.py`). CPU: user+sys seconds per GiB of each"
        " process while the clock ran (what a server used starting up before it is left out, on both"
        " sides; ours: agent, its sender child — whose start-up, before the clock as the agent's spare, is"
        " left out too —,"
        " process server, master target; the peer: nbdcopy and both qemu-nbd). The start-up row takes"
        " out the time until the agent's first byte sent, which the peer's C `nbdcopy` hardly has."
        " The random image is the worst case (nothing to skip or compress) and the"
        " target's row; the mixed image is a more realistic disk. The box is shared with other"
        " engineers' jobs (load average below).",
        keep_history=True,
    )


if __name__ == "__main__":
    main()
