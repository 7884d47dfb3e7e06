"""Fixtures for the data plane: a CA, identities, and real component processes on loopback.

Certificates name their component as the configuration server's do (`urn:siterecovery:<kind>:<id>`,
here the id is the component's name), and every hop gets the assignments that authorise its peers:
a process server the pairs it relays (written when an agent is given replications), a master
target the process server of each disk.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import pytest
from tests.conftest import require_tool

from siterecovery.dataplane.links import Identity
from siterecovery.pki import CertificateAuthority

CLI = [sys.executable, "-m", "siterecovery.cli.dataplane"]


def wait_for(check: Callable[[], bool], timeout: float = 60.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def free_addresses(count: int) -> list[str]:
    """Distinct free loopback addresses: the sockets stay bound until all ports are chosen."""
    socks = [socket.create_server(("127.0.0.1", 0)) for _ in range(count)]
    try:
        return [f"127.0.0.1:{s.getsockname()[1]}" for s in socks]
    finally:
        for s in socks:
            s.close()


def read_stats(state_dir: Path) -> dict[str, object]:
    path = state_dir / "stats.json"
    try:
        return dict(json.loads(path.read_text()))
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


@dataclass
class Component:
    args: list[str]
    state_dir: Path
    log: Path
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Component:
        (self.state_dir / "address").unlink(missing_ok=True)
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen([*CLI, *self.args], stdout=out, stderr=subprocess.STDOUT)
        return self

    def wait_address(self) -> str:
        path = self.state_dir / "address"

        def written() -> bool:
            return path.exists() and bool(path.read_text().strip())

        # A process start on a loaded 2-core box takes seconds to tens of seconds; one that exits
        # ends the wait at once.
        wait_for(
            lambda: written() or self.proc is None or self.proc.poll() is not None,
            120,
            f"{self.args[0]} to listen",
        )
        if not written():
            raise AssertionError(f"{self.args[0]} exited:\n{self.log.read_text()}")
        return path.read_text().strip()

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=60)
        self.proc = None

    def stats(self) -> dict[str, object]:
        return read_stats(self.state_dir)


@dataclass
class Plane:
    root: Path
    ca: CertificateAuthority
    components: list[Component] = field(default_factory=list)

    def identity(self, state_dir: Path, name: str, kind: str = "agent") -> Identity:
        ident = Identity.in_dir(state_dir)
        ident.write(self.ca.issue(f"{kind}:{name}", kind=kind, component_id=name))
        return ident

    def component(self, kind: str, name: str, *args: str) -> Component:
        state = self.root / name
        self.identity(state, name, kind)
        comp = Component([kind, *args], state, self.root / f"{name}.log")
        self.components.append(comp)
        return comp

    def process_server(
        self, name: str = "ps", listen: str = "127.0.0.1:0", relays: list[dict[str, object]] | None = None
    ) -> Component:
        state = self.root / name
        self.assign_relays(name, relays or [])
        return self.component(
            "process-server",
            name,
            "--cache-dir",
            str(state),
            "--listen",
            listen,
            "--interval",
            "0.3",
            "--assignments",
            str(self.root / f"{name}-assignments.json"),
        )

    def assign_relays(
        self, ps: str, relays: list[dict[str, object]], revoked: list[str] | None = None
    ) -> None:
        """(Re)write a process server's desired state: the pairs it relays, the revoked serials."""
        write_json(self.root / f"{ps}-assignments.json", {"pairs": relays, "revoked": revoked or []})

    def _named(self, address: str) -> str:
        """The name of the started component listening at `address` ("" if none)."""
        for comp in self.components:
            path = comp.state_dir / "address"
            listen = comp.args[comp.args.index("--listen") + 1] if "--listen" in comp.args else ""
            if address == listen or (path.exists() and path.read_text().strip() == address):
                return comp.state_dir.name
        return ""

    def master_target(
        self,
        disks: list[dict[str, object]],
        name: str = "mt",
        listen: str = "127.0.0.1:0",
        process_server: str = "ps",
    ) -> Component:
        state = self.root / name
        assignments = self.root / f"{name}-assignments.json"
        # Each disk accepts `process_server` unless the test names another.
        write_json(assignments, {"disks": [{"process_server": process_server, **d} for d in disks]})
        (self.root / "retention").mkdir(exist_ok=True)
        return self.component(
            "master-target",
            name,
            "--os",
            "linux",
            "--retention-volume",
            str(self.root / "retention"),
            "--state-dir",
            str(state),
            "--listen",
            listen,
            "--assignments",
            str(assignments),
            "--interval",
            "0.3",
        )

    def agent(
        self, replications: list[dict[str, object]], disks: dict[str, Path], name: str = "agent", *extra: str
    ) -> Component:
        state = self.root / name
        assignments = self.root / f"{name}-assignments.json"
        assignments.write_text(json.dumps({"replications": replications}))
        # Each process server already started relays these pairs from this agent (when not told).
        for rep in replications:
            ps, mt = self._named(str(rep["process_server"])), self._named(str(rep["master_target"]))
            relays_file = self.root / f"{ps}-assignments.json"
            if not ps or not relays_file.exists():
                continue
            relays = json.loads(relays_file.read_text())["pairs"]
            if not any(r["pair_id"] == rep["pair_id"] for r in relays):
                image = disks[str(rep["disk"])]
                size = os.stat(image).st_size
                relays.append(relay(str(rep["pair_id"]), name, str(rep["master_target"]), mt, size))
                self.assign_relays(ps, relays)
        args = [
            "--machine",
            name,
            "--state-dir",
            str(state),
            "--assignments",
            str(assignments),
            "--nbd-unix-dir",
            str(self.root / "nbd"),
            "--interval",
            "0.3",
            *extra,
        ]
        for label, path in disks.items():
            args += ["--disk", f"{label}={path}"]
        return self.component("agent", name, *args)

    def stop_all(self) -> None:
        for comp in self.components:
            comp.kill(signal.SIGKILL)


@pytest.fixture
def plane(tmp_path: Path) -> Iterator[Plane]:
    p = Plane(tmp_path, CertificateAuthority.load_or_create(tmp_path / "ca"))
    try:
        yield p
    finally:
        p.stop_all()


def write_json(path: Path, doc: object) -> None:
    """Replace `path` at once: the services re-read their assignments file every interval."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc))
    os.replace(tmp, path)


def relay(pair: str, agent: str, mt_addr: str, mt: str, size: int) -> dict[str, object]:
    """A process server's assignment: `pair` only from `agent`, forwarded to master target `mt`."""
    return {"pair_id": pair, "agent": agent, "master_target": mt_addr, "master_target_id": mt, "size": size}


def make_image(path: Path, size: int, writes: list[tuple[int, int, int]] | None = None) -> Path:
    """A sparse raw image with `writes` of (offset, length, byte pattern)."""
    with open(path, "wb") as f:
        f.truncate(size)
        for off, length, pattern in writes or []:
            f.seek(off)
            f.write(bytes([pattern]) * length)
    return path


def random_image(path: Path, size: int, data_ranges: list[tuple[int, int]]) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
        for off, length in data_ranges:
            f.seek(off)
            f.write(os.urandom(length))
    return path


def replication(pair: str, disk: str, ps: str, mt: str, mode: str = "full") -> dict[str, object]:
    return {"pair_id": pair, "disk": disk, "process_server": ps, "master_target": mt, "sync_mode": mode}


def pair_stats(agent: Component, pair: str) -> dict[str, object]:
    for p in agent.stats().get("pairs", []):  # type: ignore[union-attr]
        if p["pair_id"] == pair:  # type: ignore[index]
            return dict(p)  # type: ignore[arg-type]
    return {}


def applied_seq(mt: Component, pair: str) -> int:
    for p in mt.stats().get("pairs", []):  # type: ignore[union-attr]
        if p["pair_id"] == pair:  # type: ignore[index]
            return int(p["applied_seq"])  # type: ignore[index]
    return -1


def wait_fresh_stats(*components: Component, timeout: float = 30.0) -> None:
    """Until every component has published its stats twice since now.

    `stats.json` is rewritten each interval: a snapshot read right after the caller's writes may
    predate their capture (it once said "replicated" with 9 MiB still unsent). The first rewrite
    may have been computed before now, the second cannot have been."""

    def rewritten_since(since: int) -> bool:
        try:
            return all((c.state_dir / "stats.json").stat().st_mtime_ns > since for c in components)
        except FileNotFoundError:
            return False

    for _ in range(2):
        since = time.time_ns()
        wait_for(functools.partial(rewritten_since, since), timeout, "fresh stats")


def wait_replicated(agent: Component, mt: Component, pair: str, timeout: float = 90.0) -> None:
    """Until the agent's pair is protected with an empty spool and the MT applied all it sent
    (judged on stats published after the call, never on an older snapshot)."""
    wait_fresh_stats(agent, mt)

    def done() -> bool:
        s = pair_stats(agent, pair)
        acked = int(s.get("acked_seq", -1))  # type: ignore[call-overload]
        return (
            s.get("state") == "protected"
            and s.get("spool_bytes") == 0
            and acked >= 0
            and applied_seq(mt, pair) >= acked
        )

    wait_for(done, timeout, f"pair {pair} to be replicated")


class OnePair(NamedTuple):
    """One pair "p1" of disk "d0" from `agent` through `ps` to `mt`, as most data-plane tests set up."""

    mt: Component
    ps: Component
    agent: Component


def one_pair(
    plane: Plane, src: Path, target: Path | str, size: int, *mt_extra: str, master_target_up: bool = True
) -> OnePair:
    """Starts a process server, an agent serving `src` as "d0" and (unless `master_target_up` is
    False: the test starts it later) a master target writing `target` (given `mt_extra` arguments),
    all for pair "p1"."""
    ps_addr, mt_addr = free_addresses(2)
    mt = plane.master_target([{"pair_id": "p1", "path": str(target), "size": size}], listen=mt_addr)
    mt.args += mt_extra
    if master_target_up:
        mt.start()
    ps = plane.process_server(listen=ps_addr).start()
    ps.wait_address()
    if master_target_up:
        mt.wait_address()
    agent = plane.agent([replication("p1", "d0", ps_addr, mt_addr)], {"d0": src}).start()
    return OnePair(mt, ps, agent)


def compare_raw(a: Path, b: Path) -> int:
    """`qemu-img compare` of two raw images: 0 when their contents are the same."""
    return subprocess.run(
        [require_tool("qemu-img"), "compare", "-f", "raw", "-F", "raw", str(a), str(b)], capture_output=True
    ).returncode


def wait_generation(agent: Component, pair: str, generation: int, timeout: float = 120.0) -> None:
    """Until the agent has taken up `generation` of `pair`: saved in the pair's state with its new
    sync planned (`replica.py`), so statistics published after this show that sync until it is done.

    A wait for a raised generation's resync must start here, not from `captured_seq` moving: the
    crash bookmark the agent inserts as soon as a sync ends (bookmarks wait while a pair syncs)
    moves it too, and when it came after the caller's snapshot it ended such a wait before the
    resync began (bench_resync's "target differs from source" in session 8)."""
    state = agent.state_dir / "pairs" / pair / "state.json"

    def taken() -> bool:
        try:
            return int(json.loads(state.read_text())["generation"]) >= generation
        except (FileNotFoundError, json.JSONDecodeError, KeyError):
            return False

    wait_for(taken, timeout, f"the agent to take up generation {generation} of {pair}")
