"""The replication pipeline the data-plane benches time: agent → process server → master target
as real processes over mutual TLS, desired state from files (no configuration server)."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from siterecovery.dataplane.links import Identity
from siterecovery.dataplane.master_target import JOURNAL_DIR
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


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a live process has used so far (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def child_pids(pid: int) -> list[int]:
    """The live children of `pid` (e.g. the agent's sender child)."""
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(FileNotFoundError):
            out += [int(c) for c in (task / "children").read_text().split()]
    return out


def chain_cpu(pids: dict[str, int]) -> dict[str, float]:
    """CPU seconds of each process of the chain, the agent's sender child(ren) as "sender"."""
    out = {name: cpu_seconds(pid) for name, pid in pids.items()}
    if "agent" in pids:
        out["sender"] = sum(cpu_seconds(c) for c in child_pids(pids["agent"]))
    return out


def _wait_spare_ready(agent: int, timeout: float = 30.0) -> None:
    """Until the agent's spare sender child has imported everything and waits for its pair (asleep,
    its CPU time not growing: a nice'd child waiting for a CPU is runnable, not asleep); at most
    `timeout` seconds (an agent without a spare has no child)."""
    deadline = time.monotonic() + timeout
    last = -1.0
    while time.monotonic() < deadline:
        kids = child_pids(agent)
        asleep = bool(kids) and all(_state(c) == "S" for c in kids)
        used = sum(cpu_seconds(c) for c in kids) if asleep else -1.0
        if asleep and used == last:
            return
        last = used
        time.sleep(0.2)


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return ""


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


def _agent_cmd(root: Path, src: Path, *extra: str, interval: float = 0.05) -> list[str]:
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
        str(interval),
        *extra,
    ]


def _mt_cmd(root: Path, mt_addr: str) -> list[str]:
    return [
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
    ]


def _ps_cmd(root: Path, ps_addr: str) -> list[str]:
    return [
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
    ]


def _identities(
    root: Path, ca: CertificateAuthority, target: Path, size: int, mt_addr: str
) -> dict[str, object]:
    """Certificates of the three services, and the process server's pair-scoped relay of pair "p"
    (only from "agent", only to "mt"); returns the master target's desired state."""
    # A fresh master target: its retention journal too (else it skips sequences a previous run applied).
    shutil.rmtree(root / JOURNAL_DIR, ignore_errors=True)
    for name, kind in (("agent", "agent"), ("ps", "process-server"), ("mt", "master-target")):
        shutil.rmtree(root / name, ignore_errors=True)
        Identity.in_dir(root / name).write(ca.issue(f"{kind}:{name}", kind=kind, component_id=name))
    relay: dict[str, object] = {"pair_id": "p", "agent": "agent", "master_target": mt_addr}
    relay["master_target_id"] = "mt"
    relay["size"] = size
    _write_json(root / "ps.json", {"pairs": [relay]})
    return {"disks": [{"pair_id": "p", "path": str(target), "size": size, "process_server": "ps"}]}


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
    cpu: dict[str, float] | None = None,
    on_start: Callable[[dict[str, int]], None] | None = None,
    startup: list[float] | None = None,
) -> tuple[float, int]:
    """Run agent → process server → master target (real processes, mutual TLS, no configuration
    server: desired state from files) until `target` equals `src`; seconds and bytes the agent sent.

    By default the clock starts with the agent process (its start-up is included). With
    `services_running` all three services are started first with nothing assigned, as they run in
    the product; then `before_start` runs (e.g. dropping the page cache) and the clock starts when
    the pair is written into the agent's and master target's assignment files (both re-read every
    0.05 s, so up to one interval of pick-up latency is included).

    `cpu`, if given, receives each process's CPU seconds (user + system, `chain_cpu`) used while the
    clock ran: what the services started before the clock used before it (a Python process and its
    imports, ~0.5 CPU-s each: a fixed cost the peer's C servers hardly have) is left out;
    `on_start` is called with the processes' ids once the clock runs (e.g. to attach a profiler);
    `startup`, if given, receives the seconds from the clock's start until the agent's statistics
    first show bytes sent (its sender child started and connected: a fixed cost the peer's C
    `nbdcopy` hardly has; the sender child reports bytes sent every 0.25 s, the agent writes its
    statistics every 0.05 s: up to ~0.3 s late).
    """
    procs: list[subprocess.Popen[bytes]] = []
    ps_addr, mt_addr = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    mt_desired = _identities(root, ca, target, size, mt_addr)
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
        procs.append(subprocess.Popen(_mt_cmd(root, mt_addr), stdout=log, stderr=log))
        procs.append(subprocess.Popen(_ps_cmd(root, ps_addr), stdout=log, stderr=log))
        if services_running:
            procs.append(subprocess.Popen(_agent_cmd(root, src), stdout=log, stderr=log))
        wait_until(lambda: (root / "mt" / "address").exists() and (root / "ps" / "address").exists(), 30)
        if services_running:
            wait_until(lambda: bool(stats(root / "agent")) and bool(stats(root / "mt")), 30)
            if before_start is not None:
                before_start()
        before = {"mt": cpu_seconds(procs[0].pid), "ps": cpu_seconds(procs[1].pid)}
        if services_running:
            _wait_spare_ready(procs[2].pid)
            before["agent"] = cpu_seconds(procs[2].pid)
            # The agent's spare sender child (`SpareChild`), started with it: its start-up is left
            # out as the services' is.
            before["sender"] = sum(cpu_seconds(c) for c in child_pids(procs[2].pid))
        start = time.monotonic()
        if services_running:
            _write_json(root / "mt.json", mt_desired)
            _write_json(root / "agent.json", agent_desired)
        else:
            procs.append(subprocess.Popen(_agent_cmd(root, src), stdout=log, stderr=log))
        pids = {"mt": procs[0].pid, "ps": procs[1].pid, "agent": procs[2].pid}
        if on_start is not None:
            on_start(pids)

        def done() -> bool:
            pairs = stats(root / "agent").get("pairs") or []
            if startup is not None and not startup and pairs and pairs[0]["bytes_sent"]:  # type: ignore[index]
                startup.append(time.monotonic() - start)
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
        if cpu is not None:
            used = chain_cpu(pids)
            cpu.update({name: seconds - before.get(name, 0.0) for name, seconds in used.items()})
    finally:
        _stop(procs, log)
    _check_equal(src, target)
    return elapsed, sent


@dataclass(frozen=True)
class Resync:
    """A delta resync of a pair the running services replicated themselves (`replicate_then_resync`)."""

    full_seconds: float  # the initial full replication (agent start-up excluded)
    seconds: float  # the delta resync, from raising the pair's generation to the last block applied
    sent: int  # bytes the agent sent for the resync
    replica_read: int  # bytes of the replica the master target read to answer it


def replicate_then_resync(
    root: Path,
    ca: CertificateAuthority,
    src: Path,
    target: Path,
    size: int,
    change: Callable[[], None],
    before_start: Callable[[], None],
) -> Resync:
    """As in the product: the services run; pair "p" is replicated in full (so the master target
    keeps the replica's block digests), then `change` rewrites part of `src` behind the agent's
    back, `before_start` runs (dropping the page cache), and the pair's generation is raised with
    sync mode delta: timed until the master target has durably applied the resync's last block."""
    procs: list[subprocess.Popen[bytes]] = []
    ps_addr, mt_addr = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    mt_desired = _identities(root, ca, target, size, mt_addr)
    pair = {"pair_id": "p", "disk": "d", "process_server": ps_addr, "master_target": mt_addr}
    _write_json(root / "mt.json", {"disks": []})
    _write_json(root / "agent.json", {"replications": []})
    log = open(root / "services.log", "ab")  # noqa: SIM115 - closed below, after the processes
    try:
        procs.append(subprocess.Popen(_mt_cmd(root, mt_addr), stdout=log, stderr=log))
        procs.append(subprocess.Popen(_ps_cmd(root, ps_addr), stdout=log, stderr=log))
        procs.append(subprocess.Popen(_agent_cmd(root, src), stdout=log, stderr=log))
        wait_until(lambda: (root / "mt" / "address").exists() and (root / "ps" / "address").exists(), 30)
        wait_until(lambda: bool(stats(root / "agent")) and bool(stats(root / "mt")), 30)

        def pair_stats() -> tuple[dict[str, object], dict[str, object]] | None:
            pairs = stats(root / "agent").get("pairs") or []
            mt_pairs = stats(root / "mt").get("pairs") or []
            return (pairs[0], mt_pairs[0]) if pairs and mt_pairs else None  # type: ignore[index]

        def synced(after: int) -> bool:
            got = pair_stats()
            if got is None:
                return False
            p, m = got
            return bool(
                int(p["captured_seq"]) > after  # type: ignore[call-overload]
                and p["state"] == "protected"
                and p["acked_seq"] >= 0  # type: ignore[operator]
                and m["applied_seq"] >= p["acked_seq"]  # type: ignore[operator]
            )

        start = time.monotonic()
        _write_json(root / "mt.json", mt_desired)
        _write_json(root / "agent.json", {"replications": [{**pair, "sync_mode": "full"}]})
        wait_until(lambda: synced(-1), 3600)
        full = time.monotonic() - start
        got = pair_stats()
        assert got is not None
        captured, sent0 = int(got[0]["captured_seq"]), int(got[0]["bytes_sent"])  # type: ignore[call-overload]
        change()
        before_start()
        start = time.monotonic()
        resync = {**pair, "sync_mode": "delta", "generation": 2}
        _write_json(root / "agent.json", {"replications": [resync]})
        # Only statistics written after the agent took the new generation up (saved with the sync
        # planned) can say the resync is done. `captured_seq` moving is no sign of it: the crash
        # bookmark the agent inserts as soon as a sync ends (bookmarks wait while a pair syncs)
        # moves it too; read before that bookmark, it ended this wait before the resync began, and
        # the services were killed with the replica not resynced (session 8's "target differs").
        wait_until(lambda: _generation(root / "agent" / "pairs" / "p" / "state.json") >= 2, 3600)
        for _ in range(2):  # the first rewrite may have been computed before the take-up
            _rewritten(root / "agent" / "stats.json")
        wait_until(lambda: synced(captured), 3600)
        elapsed = time.monotonic() - start
        got = pair_stats()
        assert got is not None
        sent = int(got[0]["bytes_sent"]) - sent0  # type: ignore[call-overload]
        read = int(got[1].get("replica_bytes_read", 0))  # type: ignore[call-overload]
    finally:
        _stop(procs, log)
    _check_equal(src, target)
    return Resync(full, elapsed, sent, read)


def _generation(state: Path) -> int:
    """The generation an agent's pair has taken up (its `state.json`); 0 before it is written."""
    try:
        return int(json.loads(state.read_text())["generation"])
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return 0


def _rewritten(path: Path) -> None:
    """Until `path` (a statistics file) is replaced after now."""
    since = time.time_ns()

    def newer() -> bool:
        try:
            return path.stat().st_mtime_ns > since
        except FileNotFoundError:
            return False

    wait_until(newer, 60)


@dataclass(frozen=True)
class PairSample:
    """One look at the pair in the services' own stats files (each rewritten every 0.05 s)."""

    at: float  # time.monotonic() of the look
    captured_seq: int  # the agent's newest captured write
    acked_seq: int  # what the process server has acknowledged
    applied_seq: int  # what the master target has made durable
    spool_bytes: int  # the agent's spool


@dataclass(frozen=True)
class Protected:
    """A protected disk: the agent's live NBD export, with replication running behind it."""

    sock: Path  # the agent's export of disk `d` (Unix socket)
    root: Path
    pids: dict[str, int]  # agent, process server, master target

    def sample(self) -> PairSample | None:
        agent = stats(self.root / "agent").get("pairs") or []
        mt = stats(self.root / "mt").get("pairs") or []
        if not agent or not mt:
            return None
        a, m = agent[0], mt[0]  # type: ignore[index]
        return PairSample(
            time.monotonic(),
            int(a["captured_seq"]),
            int(a["acked_seq"]),
            int(m["applied_seq"]),
            int(a.get("spool_bytes", 0)),
        )

    def caught_up(self) -> bool:
        s = self.sample()
        return s is not None and s.applied_seq >= s.captured_seq


@contextmanager
def protected_disk(
    root: Path,
    ca: CertificateAuthority,
    src: Path,
    target: Path,
    size: int,
    agent_interval: float = 0.05,
    spool_limit: int | None = None,
) -> Iterator[Protected]:
    """Agent, process server and master target as processes over mutual TLS (as in `sync_once`),
    the agent also serving `src` over NBD on a Unix socket (as the product does for a protected
    machine); yields once the pair is protected (initial sync done), kills them all on exit.
    `agent_interval`: the agent's stats/heartbeat interval (the product's is 10 s); `spool_limit`:
    the agent's `--spool-limit` in bytes (None: the product's default, 1 GiB)."""
    procs: list[subprocess.Popen[bytes]] = []
    ps_addr, mt_addr = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    _write_json(root / "mt.json", _identities(root, ca, target, size, mt_addr))
    pair = {
        "pair_id": "p",
        "disk": "d",
        "process_server": ps_addr,
        "master_target": mt_addr,
        "sync_mode": "full",
    }
    _write_json(root / "agent.json", {"replications": [pair]})
    nbd_dir = root / "nbd"
    log = open(root / "services.log", "ab")  # noqa: SIM115 - closed below, after the processes
    try:
        procs.append(subprocess.Popen(_mt_cmd(root, mt_addr), stdout=log, stderr=log))
        procs.append(subprocess.Popen(_ps_cmd(root, ps_addr), stdout=log, stderr=log))
        wait_until(lambda: (root / "mt" / "address").exists() and (root / "ps" / "address").exists(), 60)
        limit = ["--spool-limit", str(spool_limit)] if spool_limit is not None else []
        agent_cmd = _agent_cmd(root, src, "--nbd-unix-dir", str(nbd_dir), *limit, interval=agent_interval)
        procs.append(subprocess.Popen(agent_cmd, stdout=log, stderr=log))
        disk = Protected(
            nbd_dir / "d.sock", root, {"agent": procs[2].pid, "ps": procs[1].pid, "mt": procs[0].pid}
        )

        def protected() -> bool:
            if any(p.poll() is not None for p in procs):
                raise RuntimeError(f"a service exited; see {root / 'services.log'}")
            pairs = stats(root / "agent").get("pairs") or []
            return bool(pairs) and pairs[0]["state"] == "protected" and disk.sock.exists()  # type: ignore[index]

        wait_until(protected, 600)
        yield disk
    finally:
        for p in procs:
            p.send_signal(signal.SIGKILL)
            p.wait()
        log.close()


def machine_description() -> str:
    """The machine a result was measured on, for the results files."""
    return (
        f"{platform.node()}: {platform.platform()}, {os.cpu_count()} CPUs, Python {platform.python_version()}"
    )


def report(
    path: Path,
    title: str,
    header: list[str],
    rows: list[tuple[str, ...]],
    note: str,
    *,
    keep_history: bool = False,
) -> None:
    """Print a results table and write it, with the machine it was measured on, to `path`; with
    `keep_history` as a new dated section after the earlier ones, with the load average."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    text = "\n".join(lines)
    print(text)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not keep_history or not path.exists():
        path.write_text(f"# {title}\n\nMachine: {machine_description()}\n{note}\n\n{text}\n")
        return
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    section = f"\n## {when}: {title}\n\nMachine: {machine_description()}; load average after the run {load}\n"
    with open(path, "a") as f:
        f.write(f"{section}{note}\n\n{text}\n")


def _stop(procs: list[subprocess.Popen[bytes]], log: IO[bytes]) -> None:
    for p in procs:
        p.send_signal(signal.SIGKILL)
        p.wait()
    log.close()


def _check_equal(src: Path, target: Path) -> None:
    if subprocess.run(
        ["qemu-img", "compare", "-q", "-f", "raw", "-F", "raw", str(src), str(target)]
    ).returncode:
        raise AssertionError("target differs from source")
