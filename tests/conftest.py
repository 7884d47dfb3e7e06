"""Shared test helpers: real tools are required in CI and skipped (never faked) elsewhere."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from bench import pg

from siterecovery.demo.environment import Environment

ROOT = Path(__file__).resolve().parent.parent
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
SITERECOVERY = str(Path(sys.executable).with_name("siterecovery"))
# Components started by tests heartbeat every 2 s even when idle (their default idle interval is
# longer, docs/operations.md): tests wait for reports, and must not wait longer than before.
os.environ.setdefault("SITERECOVERY_DEFAULT_INTERVAL", "2")
# pytest's per-test timeout (300 s, pyproject.toml) for the folders whose tests run whole
# deployments: the first test of a module or session also starts the deployment, and every wait
# inside is bounded on its own (a job, the writer's progress, a restart). At load 25-30 on 2 cores
# a faults scenario took over 300 s (setup 55-83 s) and an e2e cycle 180 s, where CI takes 25-65 s;
# this is only the guard against a hang.
DEPLOYMENT_TIMEOUT = {"faults": 900, "e2e": 900}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        folder = item.path.parent
        seconds = DEPLOYMENT_TIMEOUT.get(folder.name) if folder.parent == ROOT / "tests" else None
        if seconds and item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(seconds))


def require_tool(name: str) -> str:
    """Path of a system tool the test needs; in CI a missing tool fails the test, never skips it."""
    path = shutil.which(name)
    if path:
        return path
    if IN_CI:
        pytest.fail(f"{name} is required in CI (make system-deps installs it)")
    pytest.skip(f"{name} not installed (make system-deps installs it)")


def require_postgres() -> None:
    """PostgreSQL's server binaries (bench.pg starts throwaway clusters with them); in CI their
    absence fails the test, never skips it."""

    try:
        pg.pg_bin("initdb")
    except RuntimeError:
        if IN_CI:
            pytest.fail("PostgreSQL is required in CI (make system-deps installs it)")
        pytest.skip("PostgreSQL not installed (make system-deps installs it)")


def data_extents(path: Path) -> list[tuple[int, int]]:
    """(start, end) of every data extent of a file, from SEEK_DATA/SEEK_HOLE: where holes are."""
    out: list[tuple[int, int]] = []
    with open(path, "rb") as f:
        fd, size, pos = f.fileno(), os.fstat(f.fileno()).st_size, 0
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:
                break
            pos = os.lseek(fd, start, os.SEEK_HOLE)
            out.append((start, pos))
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_cli(
    *args: str, env: dict[str, str] | None = None, check: bool = True, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """Run the real `siterecovery` command."""
    proc = subprocess.run(
        [SITERECOVERY, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"siterecovery {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
        )
    return proc


def lab_pid(pidfile: Path) -> int | None:
    """The pid in a lab pid file if that process still runs (the file holds its start time too)."""
    try:
        raw, started = pidfile.read_text().split()
        with contextlib.suppress(ChildProcessError):
            os.waitpid(int(raw), os.WNOHANG)  # powered on from this process: reap it
        stat = Path(f"/proc/{raw}/stat").read_text()
    except (FileNotFoundError, ValueError):
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    return int(raw) if fields[0] not in ("Z", "X") and fields[19] == started else None


def kill_lab(lab_dir: Path) -> None:
    """kill -9 every lab machine: each guest's and each agent's process group (a VM guest's QEMU,
    an agent's sender children), then wait until they are gone (bounded)."""
    pidfiles = [*(lab_dir / "run").glob("*/*/guest.pid"), *(lab_dir / "run").glob("*/*/export.pid")]
    for pidfile in pidfiles:
        pid = lab_pid(pidfile)
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)  # runtime spawns each in a session of its own
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    for pidfile in pidfiles:
        while lab_pid(pidfile) is not None:
            assert time.monotonic() < deadline, f"{pidfile} outlived kill -9"
            time.sleep(0.02)


def stop_environment(env: Environment) -> None:
    """A test deployment's teardown: kill -9 its lab machines (guests and agents), then every
    component (process servers, master targets, agents the test started), then `env.stop()` (the
    configuration server, SIGTERM).

    A lab machine's orderly stop (the guest's clean shutdown, the agent draining to its process
    server) and each component's (drains, a last heartbeat) take about a second each, a dozen
    per deployment; no test that uses this is about that exit (the shutdown tests stop their
    machines and components themselves)."""
    kill_lab(env.lab_dir)
    for name, proc in list(env.procs.items()):
        if name != "server" and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)
    env.stop()


@pytest.fixture
def output_dir(request: pytest.FixtureRequest) -> Path:
    """Per-test folder under test-output/ for artefacts (screenshots, logs)."""
    path = ROOT / "test-output" / request.node.name.replace("/", "_")
    path.mkdir(parents=True, exist_ok=True)
    return path
