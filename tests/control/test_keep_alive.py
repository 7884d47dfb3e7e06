"""An idle component keeps one connection to the configuration server across its interval.

uvicorn closes a connection idle for 5 s unless told otherwise, and httpx drops one idle for 5 s:
an agent heartbeating every 10 s would open a new connection (and over HTTPS do a new handshake)
for every heartbeat. The server's `keep_alive_seconds` must reach the HTTP server, and both ends'
idle limits must lie beyond the longest interval, the component's shorter than the server's.
"""

from __future__ import annotations

import resource
import socket
import subprocess
import sys
import time
from pathlib import Path

from siterecovery.config import AGENT_INTERVAL, COMPONENT_KEEP_ALIVE, SERVER_INTERVAL, ServerConfig
from siterecovery.control.admission import LONGEST
from siterecovery.dataplane.control_client import ControlClient, Registration
from siterecovery.server.main import raise_open_files_limit, uvicorn_settings
from tests.control.conftest import ConfigServer


def test_idle_limits_lie_beyond_every_interval_the_component_first() -> None:
    server = float(str(uvicorn_settings(ServerConfig())["timeout_keep_alive"]))
    assert server == ServerConfig().keep_alive_seconds
    # Longest interval honoured < component's keep-alive < the server's: the component closes an
    # idle connection itself, never sends on one the server is closing.
    assert max(AGENT_INTERVAL, SERVER_INTERVAL) <= LONGEST < COMPONENT_KEEP_ALIVE < server


def test_the_components_client_keeps_its_connection_past_its_interval(tmp_path: Path) -> None:
    client = ControlClient("http://127.0.0.1:9", tmp_path, Registration("agent", "a1", "onprem"))
    try:
        pool = client._http._transport._pool  # type: ignore[attr-defined]
        assert pool._keepalive_expiry == COMPONENT_KEEP_ALIVE
    finally:
        client.close()


def _get(sock: socket.socket) -> bytes:
    sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    answer = b""
    while b'"ok"' not in answer:
        chunk = sock.recv(4096)
        assert chunk, f"the server closed the connection: {answer!r}"
        answer += chunk
    return answer


def test_a_connection_idle_longer_than_uvicorns_default_is_kept(cs: ConfigServer) -> None:
    # The one wait of this module: idle past uvicorn's own keep-alive (5 s, which closed every
    # idle agent's connection), far below the server's (75 s), so a slow machine cannot fail it.
    with socket.create_connection(("127.0.0.1", cs.port), timeout=60) as sock:
        assert _get(sock).startswith(b"HTTP/1.1 200")
        time.sleep(6.0)
        assert _get(sock).startswith(b"HTTP/1.1 200")  # the same connection answers again


def test_the_open_files_limit_is_raised_to_the_hard_one() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    lower = min(soft, 256)
    resource.setrlimit(resource.RLIMIT_NOFILE, (lower, hard))
    try:
        raised = raise_open_files_limit()
        assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] == raised
        assert raised > lower
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_what_the_server_built_before_serving_is_out_of_the_collectors_reach() -> None:
    # In a child: freezing is for the life of the process, not for the test runner's.
    code = (
        "import gc; from siterecovery.server.main import GC_YOUNG_THRESHOLD, settle_garbage_collector;"
        "assert gc.get_freeze_count() == 0; settle_garbage_collector();"
        "assert gc.get_freeze_count() > 10000, gc.get_freeze_count();"
        "assert gc.get_threshold()[0] == GC_YOUNG_THRESHOLD"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
