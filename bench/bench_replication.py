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
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from siterecovery.dataplane.links import Identity
from siterecovery.pki import CertificateAuthority

RESULTS = Path(__file__).resolve().parent / "results" / "replication.md"
CLI = [sys.executable, "-m", "siterecovery.cli.dataplane"]
MiB = 1 << 20


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait(check: object, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():  # type: ignore[operator]
            return
        time.sleep(0.02)
    raise TimeoutError("benchmark step did not finish")


def _stats(state: Path) -> dict[str, object]:
    try:
        return dict(json.loads((state / "stats.json").read_text()))
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def _write_random(path: Path, size: int) -> None:
    with open(path, "wb") as f:
        for _ in range(size // (64 * MiB)):
            f.write(os.urandom(64 * MiB))
        f.write(os.urandom(size % (64 * MiB)))


def replicate(root: Path, ca: CertificateAuthority, src: Path, size: int) -> tuple[float, int]:
    """Seconds for a full initial replication of `src`, and bytes the agent sent."""
    procs: list[subprocess.Popen[bytes]] = []
    for name in ("agent", "ps", "mt"):
        shutil.rmtree(root / name, ignore_errors=True)
        Identity.in_dir(root / name).write(ca.issue(name))
    target = root / "target.img"
    target.unlink(missing_ok=True)
    ps_addr, mt_addr = f"127.0.0.1:{_free_port()}", f"127.0.0.1:{_free_port()}"
    (root / "mt.json").write_text(
        json.dumps({"disks": [{"pair_id": "p", "path": str(target), "size": size}]})
    )
    (root / "agent.json").write_text(
        json.dumps(
            {
                "replications": [
                    {"pair_id": "p", "disk": "d", "process_server": ps_addr, "master_target": mt_addr}
                ]
            }
        )
    )
    log = open(root / "services.log", "ab")  # noqa: SIM115 - closed below, after the processes
    try:
        procs.append(
            subprocess.Popen(
                [
                    *CLI,
                    "master-target",
                    "--os",
                    "linux",
                    "--retention-volume",
                    str(root),
                    "--state-dir",
                    str(root / "mt"),
                    "--listen",
                    mt_addr,
                    "--assignments",
                    str(root / "mt.json"),
                    "--interval",
                    "0.05",
                ],
                stdout=log,
                stderr=log,
            )
        )
        procs.append(
            subprocess.Popen(
                [
                    *CLI,
                    "process-server",
                    "--cache-dir",
                    str(root / "ps"),
                    "--listen",
                    ps_addr,
                    "--interval",
                    "0.5",
                ],
                stdout=log,
                stderr=log,
            )
        )
        _wait(lambda: (root / "mt" / "address").exists() and (root / "ps" / "address").exists(), 30)
        start = time.monotonic()
        procs.append(
            subprocess.Popen(
                [
                    *CLI,
                    "agent",
                    "--machine",
                    "bench",
                    "--state-dir",
                    str(root / "agent"),
                    "--assignments",
                    str(root / "agent.json"),
                    "--disk",
                    f"d={src}",
                    "--interval",
                    "0.05",
                ],
                stdout=log,
                stderr=log,
            )
        )

        def done() -> bool:
            pairs = _stats(root / "agent").get("pairs") or []
            mt_pairs = _stats(root / "mt").get("pairs") or []
            if not pairs or not mt_pairs:
                return False
            p, m = pairs[0], mt_pairs[0]  # type: ignore[index]
            return bool(
                p["state"] == "protected" and p["acked_seq"] >= 0 and m["applied_seq"] >= p["acked_seq"]
            )

        _wait(done, 3600)
        elapsed = time.monotonic() - start
        sent = int(_stats(root / "agent")["pairs"][0]["bytes_sent"])  # type: ignore[index]
    finally:
        for p in procs:
            p.send_signal(signal.SIGKILL)
            p.wait()
        log.close()
    if subprocess.run(
        ["qemu-img", "compare", "-q", "-f", "raw", "-F", "raw", str(src), str(target)]
    ).returncode:
        raise AssertionError("target differs from source")
    return elapsed, sent


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
        port = _free_port()
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
        time.sleep(1.0)
        uri = "nbds://localhost:{}/?tls-certificates=" + str(client_dir)
        start = time.monotonic()
        subprocess.run(["nbdcopy", uri.format(ports[0]), uri.format(ports[1])], check=True)
        elapsed = time.monotonic() - start
    finally:
        for p in procs:
            p.terminate()
            p.wait()
    if subprocess.run(["qemu-img", "compare", "-q", "-f", "raw", "-F", "raw", str(src), str(dst)]).returncode:
        raise AssertionError("nbdcopy target differs from source")
    dst.unlink()
    return elapsed


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
            ">= 0.8x",
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
    table = [
        "| case | size | siterecovery (agent→PS→MT, mTLS) | nbdcopy qemu-nbd→qemu-nbd (TLS) "
        "| throughput ratio | target |",
        "|---|---|---|---|---|---|",
    ]
    table += ["| " + " | ".join(r) + " |" for r in rows]
    text = "\n".join(table)
    print(text)
    machine = (
        f"{platform.node()}: {platform.platform()}, {os.cpu_count()} CPUs, Python {platform.python_version()}"
    )
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(
        f"# Initial full replication\n\nMachine: {machine}\n"
        f"Time includes starting the agent process (~0.5 s).\n\n{text}\n"
    )


if __name__ == "__main__":
    main()
