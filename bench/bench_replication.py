"""Initial full replication: agent → process server → master target over mutual TLS, vs nbdcopy.

Our side: the three services run as separate processes on loopback; the agent fully copies a
random image (2 GiB by default) to the master target through the process server's disk cache; the
time runs from the agent's start until the master target has applied everything the agent sent.
The peer: `nbdcopy` between two `qemu-nbd` exports over TLS (`nbds://`, x509 credentials from the
same CA) — the same bytes over the same kind of link, one hop instead of two and no cache. Also
timed: an empty sparse 100 GiB disk (target ≤ 2 s). Prints a table and writes
`bench/results/replication.md`. Run with `python -m bench.bench_replication [--size-mib N]`.
"""

from __future__ import annotations

import argparse
import functools
import os
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from bench.plane import MiB, free_port, report, sync_once, wait_until
from siterecovery.pki import CertificateAuthority

RESULTS = Path(__file__).resolve().parent / "results" / "replication.md"


def _write_random(path: Path, size: int) -> None:
    with open(path, "wb") as f:
        for _ in range(size // (64 * MiB)):
            f.write(os.urandom(64 * MiB))
        f.write(os.urandom(size % (64 * MiB)))


def replicate(root: Path, ca: CertificateAuthority, src: Path, size: int) -> tuple[float, int]:
    """Seconds for a full initial replication of `src`, and bytes the agent sent."""
    target = root / "target.img"
    target.unlink(missing_ok=True)
    return sync_once(root, ca, src, target, size, "full")


def nbdcopy_tls(root: Path, ca: CertificateAuthority, src: Path, size: int) -> float:
    """Seconds for nbdcopy between two qemu-nbd exports over TLS on loopback."""
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
        start = time.monotonic()
        subprocess.run(["nbdcopy", uri.format(ports[0]), uri.format(ports[1])], check=True)
        elapsed = time.monotonic() - start
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


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--size-mib", type=int, default=2048)
    ap.add_argument("--empty-gib", type=int, default=100)
    args = ap.parse_args(argv)
    size = args.size_mib * MiB
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP", "/var/tmp")) as tmp:
        root = Path(tmp)
        ca = CertificateAuthority.load_or_create(root / "ca")
        src = root / "src.img"
        _write_random(src, size)
        peer = nbdcopy_tls(root, ca, src, size)
        ours, sent = replicate(root, ca, src, size)
        src.unlink()
        empty = root / "empty.img"
        with open(empty, "wb") as f:
            f.truncate(args.empty_gib << 30)
        empty_s, empty_sent = replicate(root, ca, empty, args.empty_gib << 30)
    mib = size / MiB
    rows = [
        (
            "full replication, random image",
            f"{args.size_mib} MiB",
            f"{ours:.2f} s ({mib / ours:.0f} MiB/s)",
            f"{peer:.2f} s ({mib / peer:.0f} MiB/s)",
            f"{peer / ours:.2f}x",
            ">= 1.0x",
        ),
        ("bytes sent by the agent", f"{args.size_mib} MiB", f"{sent / MiB:.1f} MiB", "-", "-", "-"),
        (
            f"empty sparse {args.empty_gib} GiB disk",
            f"{args.empty_gib} GiB",
            f"{empty_s:.2f} s, {empty_sent} B sent",
            "-",
            "-",
            "<= 2 s",
        ),
    ]
    header = [
        "case",
        "size",
        "siterecovery (agent→PS→MT, mTLS)",
        "nbdcopy qemu-nbd→qemu-nbd (TLS)",
        "throughput ratio",
        "target",
    ]
    report(
        RESULTS,
        "Initial full replication",
        header,
        rows,
        "Time includes starting the agent process (~0.5 s). The master target also keeps the"
        " replica's block digests as it applies (`target_digests.py`). The box is shared with other"
        " engineers' jobs (load average below).",
        keep_history=True,
    )


if __name__ == "__main__":
    main()
