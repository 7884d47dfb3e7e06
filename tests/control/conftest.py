"""A real configuration server process on loopback, per test."""

from __future__ import annotations

import os
import signal
import ssl
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import SITERECOVERY, free_port


@dataclass
class ConfigServer:
    state_dir: Path
    port: int
    log: Path
    token: str = ""
    proc: subprocess.Popen[bytes] | None = None
    extra_env: dict[str, str] = field(default_factory=dict)
    database_url: str = ""
    tls: bool = False
    tls_names: tuple[str, ...] = ()

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    @property
    def ca_file(self) -> Path:
        """The server's CA certificate (what `GET /api/ca` serves)."""
        return self.state_dir / "pki" / "ca.crt"

    @property
    def env(self) -> dict[str, str]:
        env = {"SITERECOVERY_SERVER": self.url, "SITERECOVERY_TOKEN": self.token}
        return {**env, "SITERECOVERY_CA_FILE": str(self.ca_file)} if self.tls else env

    def start(self) -> None:
        token_file = self.state_dir.parent / "admin-token"
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [
                    SITERECOVERY,
                    "server",
                    "--state-dir",
                    str(self.state_dir),
                    "--listen",
                    f"127.0.0.1:{self.port}",
                    "--admin-token-file",
                    str(token_file),
                    *(("--database-url", self.database_url) if self.database_url else ()),
                    *(("--tls",) if self.tls else ()),
                    *(arg for name in self.tls_names for arg in ("--tls-name", name)),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, **self.extra_env},
                start_new_session=True,
            )
        # A start (migrations, the warm-up) takes seconds quiet and tens of seconds on a loaded
        # 2-core box; one that exits ends the wait at once.
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.log.read_text()[-3000:]}")
            try:
                if httpx.get(self.url + "/healthz", timeout=1, verify=False).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        else:
            raise RuntimeError("server did not start")
        if not self.token:
            self.token = token_file.read_text().strip()

    def kill9(self) -> None:
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)

    def api(self, method: str, path: str, token: str | None = None, **kw: Any) -> httpx.Response:
        headers = {"Authorization": f"Bearer {token if token is not None else self.token}"}
        if token == "":
            headers = {}
        headers.update(kw.pop("headers", {}))
        verify = ssl.create_default_context(cafile=str(self.ca_file)) if self.tls else True
        return httpx.request(method, self.url + path, headers=headers, timeout=30, verify=verify, **kw)

    def wait_job(
        self, job_id: str, states: tuple[str, ...] = ("succeeded", "failed", "cancelled"), timeout: float = 60
    ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            job: dict[str, Any] = self.api("GET", f"/api/jobs/{job_id}").json()
            if job["state"] in states:
                return job
            time.sleep(0.2)
        raise AssertionError(f"job {job_id} did not reach {states}: {job}")


@contextmanager
def running_config_server(directory: Path, extra_env: dict[str, str] | None = None) -> Iterator[ConfigServer]:
    """A configuration server on a free port with its state and log in `directory` (and `extra_env` in
    its environment), stopped after."""
    log = directory / "server.log"
    server = ConfigServer(state_dir=directory / "state", port=free_port(), log=log, extra_env=extra_env or {})
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def cs(tmp_path: Path) -> Iterator[ConfigServer]:
    with running_config_server(tmp_path) as server:
        yield server
