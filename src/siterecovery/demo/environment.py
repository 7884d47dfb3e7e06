"""An embedded deployment on one machine: a lab, a configuration server, process servers and
master targets at both sites, all real processes on loopback.

Used by `siterecovery demo` and by the end-to-end tests, so both exercise the same set-up an
operator would do by hand (see docs/operations.md).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from siterecovery.api_client import Api
from siterecovery.fabrics.lab_build import create_lab
from siterecovery.fabrics.lab_model import Accel, GuestKind
from siterecovery.lab import runtime
from siterecovery.lab.fabric import LabFabric

START_TIMEOUT = 60.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class ServiceSpec:
    name: str
    args: tuple[str, ...]


@dataclass
class Environment:
    root: Path
    disk_size: int = 64 << 20
    registration_delay: float = 1.0
    guest: GuestKind = GuestKind.PYTHON  # VM: every machine is a real Linux VM (siterecovery.lab.vm)
    accel: Accel = Accel.AUTO
    env: dict[str, str] = field(default_factory=dict)
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    commands: dict[str, tuple[str, ...]] = field(default_factory=dict)  # each process's arguments
    token: str = ""
    port: int = 0

    @property
    def lab_dir(self) -> Path:
        return self.root / "lab"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def api(self) -> Api:
        return Api(self.url, self.token)

    @property
    def cli_env(self) -> dict[str, str]:
        return {"SITERECOVERY_SERVER": self.url, "SITERECOVERY_TOKEN": self.token}

    @property
    def passphrase_file(self) -> Path:
        return self.root / "passphrase"

    def fabric(self, site: str) -> LabFabric:
        return LabFabric(self.lab_dir, site)

    # ---- processes ----------------------------------------------------------------------------

    def _spawn(self, name: str, *args: str) -> None:
        logs = self.root / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        self.commands[name] = args
        with open(logs / f"{name}.log", "ab") as log:
            self.procs[name] = subprocess.Popen(
                [sys.executable, "-m", "siterecovery", *args],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                env={**os.environ, **self.env},
            )

    def log_tail(self, name: str, size: int = 2000) -> str:
        try:
            return (self.root / "logs" / f"{name}.log").read_text(errors="replace")[-size:]
        except FileNotFoundError:
            return ""

    def start_server(self) -> None:
        if not self.port:
            self.port = free_port()
        token_file = self.root / "admin-token"
        self._spawn(
            "server",
            "server",
            "--state-dir",
            str(self.root / "server"),
            "--listen",
            f"127.0.0.1:{self.port}",
            "--admin-token-file",
            str(token_file),
        )
        self._await(lambda: httpx.get(self.url + "/healthz", timeout=1).status_code == 200, "server")
        if not self.token:
            self.token = token_file.read_text().strip()

    def stop_server(self, kill: bool = False) -> None:
        self._stop("server", signal.SIGKILL if kill else signal.SIGTERM)

    def _await(self, ready: Any, name: str) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            proc = self.procs.get(name)
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"{name} exited:\n{self.log_tail(name)}")
            try:
                if ready():
                    return
            except (httpx.HTTPError, OSError):
                pass
            time.sleep(0.2)
        raise RuntimeError(f"{name} did not become ready:\n{self.log_tail(name)}")

    def _stop(self, name: str, sig: signal.Signals = signal.SIGTERM) -> None:
        proc = self.procs.pop(name, None)
        if proc is None or proc.poll() is not None:
            return
        os.killpg(proc.pid, sig)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)

    def start_component(self, kind: str, name: str, site: str, *extra: str) -> None:
        self.spawn_component(kind, name, site, *extra)
        self.await_connected(name)

    def await_connected(self, *names: str) -> None:
        """Wait for each of these spawned components to register and report (started together,
        their interpreters load in parallel)."""
        for name in names:
            self._await(lambda name=name: self.connected(name), name)

    def spawn_component(self, kind: str, name: str, site: str, *extra: str) -> None:
        """Start a process server or master target without waiting for it to connect."""
        state = self.root / "components" / name
        state.mkdir(parents=True, exist_ok=True)
        common = (
            "--server",
            self.url,
            "--passphrase-file",
            str(self.passphrase_file),
            "--site",
            site,
            "--name",
            name,
            "--listen",
            f"127.0.0.1:{free_port()}",
            "--interval",
            "0.5",
        )
        if kind == "process-server":
            self._spawn(
                name,
                "process-server",
                "--cache-dir",
                str(state / "cache"),
                "--state-dir",
                str(state),
                *common,
                *extra,
            )
        else:
            self._spawn(name, "master-target", "--state-dir", str(state), *common, *extra)

    def restart_component(self, name: str, kill: bool = True, extra: tuple[str, ...] = ()) -> None:
        """Stop a process server or master target (kill -9 by default) and start it again with the
        same command line (plus `extra` options), as an operator would after a crash."""
        args = (*self.commands[name], *extra)
        self._stop(name, signal.SIGKILL if kill else signal.SIGTERM)
        self._spawn(name, *args)
        self._await(lambda: self.connected(name), name)

    def stop_component(self, name: str) -> None:
        """Stop a process server or master target cleanly (SIGTERM)."""
        self._stop(name)

    def retention_volume(self, master_target: str) -> str:
        """The first eligible retention volume the master target reports (what the portal offers)."""
        for server in self.api.get("/api/servers"):
            if server["name"] == master_target:
                for volume in server["stats"].get("retention_volumes", []):
                    if volume.get("eligible", True):
                        return str(volume.get("name") or volume["path"])
        raise RuntimeError(f"master target {master_target} reports no eligible retention volume")

    def connected(self, name: str) -> bool:
        return any(s["name"] == name and s["connected"] for s in self.api.get("/api/servers"))

    # ---- the whole deployment ------------------------------------------------------------------

    def start(self) -> None:
        """Lab, configuration server, both sites as fabrics, a process server and a master target per site."""
        self.root.mkdir(parents=True, exist_ok=True)
        create_lab(self.lab_dir, self.disk_size, self.guest, self.accel)
        self.start_server()
        self.passphrase_file.write_text(self.api.get("/api/server/passphrase")["passphrase"] + "\n")
        os.chmod(self.passphrase_file, 0o600)
        retention = self.root / "retention"  # the retention drives added to each master target (RP-RET)
        for site in ("onprem", "cloud"):
            (retention / site).mkdir(parents=True, exist_ok=True)
        # All four start at once, their interpreters loading and registering in parallel while the
        # fabrics are added and the lab's sites set (two more interpreters).
        self.spawn_component("process-server", "ps-onprem", "onprem")
        self.spawn_component("process-server", "ps-cloud", "cloud")
        for site, mt in (("cloud", "mt-cloud"), ("onprem", "mt-linux")):
            self.spawn_component(
                "master-target", mt, site, "--os", "linux", "--retention-volume", str(retention / site)
            )
        for site in ("onprem", "cloud"):
            self.api.post(
                "/api/fabrics",
                {
                    "name": site,
                    "kind": "lab",
                    "site": site,
                    "connection": {"path": str(self.lab_dir), "site": site},
                },
            )
            self.lab_set(
                "site",
                site,
                f"control_server={self.url}",
                f"passphrase_file={self.passphrase_file}",
                f"agent_registration_delay={self.registration_delay}",
            )
        self.await_connected("ps-onprem", "ps-cloud", "mt-cloud", "mt-linux")

    def lab_set(self, kind: str, name: str, *assignments: str) -> None:
        subprocess.run(
            [sys.executable, "-m", "siterecovery", "lab", "set", str(self.lab_dir), kind, name, *assignments],
            check=True,
            capture_output=True,
            timeout=60,
        )

    def stop(self) -> None:
        runtime.stop_all(self.lab_dir)
        for name in [n for n in self.procs if n != "server"]:
            self._stop(name)
        self._stop("server")
