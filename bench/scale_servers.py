"""The configuration servers a control-plane bench runs: N `siterecovery server` processes.

They share one database and state directory (so one CA and one admin token). With `tls` each
serves its API over HTTPS with the server's own CA (the product's `tls` setting, `--tls`), and
every client of the bench — hollow components, registration, the API load — verifies the
server's certificate against that CA (`ca_file`), as a component given `--ca-file` does.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx

SITERECOVERY = str(Path(sys.executable).with_name("siterecovery"))


class Servers:
    """N `siterecovery server` processes on one database and state directory."""

    def __init__(self, work: Path, database_url: str, tls: bool = False) -> None:
        self.work = work
        self.state = work / "state"
        self.database_url = database_url
        self.tls = tls
        self.procs: list[subprocess.Popen[bytes]] = []
        self.urls: list[str] = []
        self.token = ""

    @property
    def ca_file(self) -> Path | None:
        """The server's CA, which every bench client verifies the API's certificate with (TLS)."""
        return self.state / "pki" / "ca.crt" if self.tls else None

    def verify(self) -> ssl.SSLContext | bool:
        """What an httpx client of the bench passes as `verify`."""
        ca = self.ca_file
        return ssl.create_default_context(cafile=str(ca)) if ca is not None else True

    def start_one(self) -> None:
        port = free_port()
        n = len(self.procs)
        log = open(self.work / f"server{n}.log", "ab")  # noqa: SIM115 - closed with the process
        cmd = [SITERECOVERY, "server", "--state-dir", str(self.state), "--listen", f"127.0.0.1:{port}"]
        cmd += ["--admin-token-file", str(self.work / "admin-token")]
        if not self.database_url.startswith("sqlite"):
            cmd += ["--database-url", self.database_url]
        if self.tls:
            cmd += ["--tls", "--tls-name", "127.0.0.1"]
        env = {**os.environ, "SITERECOVERY_NODE": f"bench-{n}"}
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        url = f"{'https' if self.tls else 'http'}://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited: {(self.work / f'server{n}.log').read_text()[-2000:]}")
            try:  # up yet? (the CA may not be written yet: the clients verify from here on)
                if httpx.get(url + "/healthz", timeout=2, verify=False).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.3)
        else:
            raise RuntimeError("server did not start")
        self.procs.append(proc)
        self.urls.append(url)
        if self.tls:  # the API's certificate chains to the CA the clients are given
            httpx.get(url + "/healthz", timeout=10, verify=self.verify()).raise_for_status()
        self.token = self.token or (self.work / "admin-token").read_text().strip()

    def cpu_seconds(self) -> float:
        total = 0.0
        for p in self.procs:
            fields = Path(f"/proc/{p.pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        return total

    def rss_mib(self) -> float:
        total = 0
        for p in self.procs:
            for line in Path(f"/proc/{p.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        return total / 1024

    def profile(self, folder: Path, label: str, seconds: float) -> Callable[..., None]:
        """Record every server process with py-spy (collapsed stacks, `folder/<label>-server<n>.txt`)
        for `seconds`; returns what waits for the recorders to finish (`interrupt`: stops them now)."""
        spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
        folder.mkdir(parents=True, exist_ok=True)
        # --gil: only samples holding the GIL (CPU in Python), not threads waiting on the database.
        options = ["--duration", str(int(seconds)), "--rate", "50", "--format", "raw", "--gil"]
        options.append("--nonblocking")
        recorders = [
            subprocess.Popen(
                [spy, "record", "--pid", str(p.pid), *options, "-o", str(folder / f"{label}-server{n}.txt")],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            for n, p in enumerate(self.procs)
        ]

        def wait(interrupt: bool = False) -> None:
            for r in recorders:
                if interrupt:
                    r.send_signal(signal.SIGINT)  # py-spy writes what it recorded so far
            for r in recorders:
                try:
                    r.wait(seconds + 60)
                except subprocess.TimeoutExpired:
                    r.kill()
                    r.wait()

        return wait

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                os.killpg(p.pid, 15)
        for p in self.procs:
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, 9)
                p.wait(5)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
