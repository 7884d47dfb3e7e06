"""The replication pipeline the data-plane benches time: agent → process server → master target
as real processes over mutual TLS, desired state from files (no configuration server)."""

from __future__ import annotations

import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from siterecovery.dataplane.links import Identity
from siterecovery.pki import CertificateAuthority

CLI = [sys.executable, "-m", "siterecovery.cli.dataplane"]
MiB = 1 << 20


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(check: object, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():  # type: ignore[operator]
            return
        time.sleep(0.02)
    raise TimeoutError("benchmark step did not finish")


def stats(state: Path) -> dict[str, object]:
    try:
        return dict(json.loads((state / "stats.json").read_text()))
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def _write_json(path: Path, doc: object) -> None:
    """Replace `path` at once: the services re-read their assignments file every interval."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc))
    os.replace(tmp, path)


def _agent_cmd(root: Path, src: Path) -> list[str]:
    return [
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
    ]


def sync_once(
    root: Path,
    ca: CertificateAuthority,
    src: Path,
    target: Path,
    size: int,
    sync_mode: str,
    *,
    services_running: bool = False,
    before_start: Callable[[], None] | None = None,
) -> tuple[float, int]:
    """Run agent → process server → master target (real processes, mutual TLS, no configuration
    server: desired state from files) until `target` equals `src`; seconds and bytes the agent sent.

    By default the clock starts with the agent process (its start-up is included). With
    `services_running` all three services are started first with nothing assigned, as they run in
    the product; then `before_start` runs (e.g. dropping the page cache) and the clock starts when
    the pair is written into the agent's and master target's assignment files (both re-read every
    0.05 s, so up to one interval of pick-up latency is included).
    """
    procs: list[subprocess.Popen[bytes]] = []
    for name, kind in (("agent", "agent"), ("ps", "process-server"), ("mt", "master-target")):
        shutil.rmtree(root / name, ignore_errors=True)
        Identity.in_dir(root / name).write(ca.issue(f"{kind}:{name}", kind=kind, component_id=name))
    ps_addr, mt_addr = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    mt_desired = {"disks": [{"pair_id": "p", "path": str(target), "size": size, "process_server": "ps"}]}
    # The process server relays pair "p" only from "agent" and only to "mt" (pair-scoped trust).
    relay: dict[str, object] = {"pair_id": "p", "agent": "agent", "master_target": mt_addr}
    relay["master_target_id"] = "mt"
    relay["size"] = size
    _write_json(root / "ps.json", {"pairs": [relay]})
    agent_desired = {
        "replications": [
            {
                "pair_id": "p",
                "disk": "d",
                "process_server": ps_addr,
                "master_target": mt_addr,
                "sync_mode": sync_mode,
            }
        ]
    }
    _write_json(root / "mt.json", {"disks": []} if services_running else mt_desired)
    _write_json(root / "agent.json", {"replications": []} if services_running else agent_desired)
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
                    "--assignments",
                    str(root / "ps.json"),
                    "--interval",
                    "0.5",
                ],
                stdout=log,
                stderr=log,
            )
        )
        if services_running:
            procs.append(subprocess.Popen(_agent_cmd(root, src), stdout=log, stderr=log))
        wait_until(lambda: (root / "mt" / "address").exists() and (root / "ps" / "address").exists(), 30)
        if services_running:
            wait_until(lambda: bool(stats(root / "agent")) and bool(stats(root / "mt")), 30)
            if before_start is not None:
                before_start()
        start = time.monotonic()
        if services_running:
            _write_json(root / "mt.json", mt_desired)
            _write_json(root / "agent.json", agent_desired)
        else:
            procs.append(subprocess.Popen(_agent_cmd(root, src), stdout=log, stderr=log))

        def done() -> bool:
            pairs = stats(root / "agent").get("pairs") or []
            mt_pairs = stats(root / "mt").get("pairs") or []
            if not pairs or not mt_pairs:
                return False
            p, m = pairs[0], mt_pairs[0]  # type: ignore[index]
            return bool(
                p["state"] == "protected" and p["acked_seq"] >= 0 and m["applied_seq"] >= p["acked_seq"]
            )

        wait_until(done, 3600)
        elapsed = time.monotonic() - start
        sent = int(stats(root / "agent")["pairs"][0]["bytes_sent"])  # type: ignore[index]
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


def machine_description() -> str:
    """The machine a result was measured on, for the results files."""
    return (
        f"{platform.node()}: {platform.platform()}, {os.cpu_count()} CPUs, Python {platform.python_version()}"
    )


def report(path: Path, title: str, header: list[str], rows: list[tuple[str, ...]], note: str) -> None:
    """Print a results table and write it, with the machine it was measured on, to `path`."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    text = "\n".join(lines)
    print(text)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"# {title}\n\nMachine: {machine_description()}\n{note}\n\n{text}\n")
