"""A server process knows its components before their first heartbeat (`control.api.warm`).

Against real server processes on loopback, counted by the process itself (`GET /api/cluster/self`,
`heartbeats`), not timed: after a restart, a registered agent's and process server's first
heartbeats are answered by the lean path with no token loaded after a miss and no desired state
built alone (the process loaded every token and kind and built every desired state before it
served); components registered after the start are learnt by one load at the first miss, and
their first heartbeats take the lean path too. Without the warm-up every first heartbeat went
to the full stack (a session and a token lookup each).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tests.control.conftest import ConfigServer, running_config_server


def _register(cs: ConfigServer, kind: str, name: str) -> tuple[str, str]:
    passphrase = cs.api("GET", "/api/server/passphrase").json()["passphrase"]
    body = {"passphrase": passphrase, "kind": kind, "name": name, "site": "onprem", "address": "127.0.0.1:9"}
    reg = cs.api("POST", "/api/components/register", token="", json=body)
    assert reg.status_code == 201, reg.text
    return reg.json()["id"], reg.json()["token"]


def _beat(cs: ConfigServer, component: tuple[str, str]) -> dict[str, Any]:
    component_id, token = component
    reply = cs.api("POST", f"/api/components/{component_id}/heartbeat", token=token, json={"stats": {}})
    assert reply.status_code == 200, reply.text
    body: dict[str, Any] = reply.json()
    return body


def _counts(cs: ConfigServer) -> dict[str, int]:
    """How the process answered heartbeats (not its loop-lag and collector counters)."""
    counts = cs.api("GET", "/api/cluster/self").json()["heartbeats"]
    return {k: int(counts[k]) for k in ("lean", "full", "token_loads", "desired_alone")}


def test_a_restarted_server_answers_known_components_first_heartbeats_on_the_lean_path(
    tmp_path: Path,
) -> None:
    # Remembered tokens are trusted past their 5 s only while heartbeats keep reading the desired
    # epoch: a long time-to-live keeps a slow machine's pauses from voiding what the start loaded.
    with running_config_server(tmp_path, {"SITERECOVERY_TOKEN_CACHE_SECONDS": "3600"}) as cs:
        agent, server = _register(cs, "agent", "warm-vm"), _register(cs, "process-server", "warm-ps")
        before = {c: _beat(cs, c)["desired_version"] for c in (agent, server)}
        cs.stop()
        cs.start()  # the same state directory and port: a restart
        assert _counts(cs) == {"lean": 0, "full": 0, "token_loads": 0, "desired_alone": 0}
        after = {c: _beat(cs, c)["desired_version"] for c in (agent, server)}
        assert after == before  # the same desired states, built before the first request
        assert _counts(cs) == {"lean": 2, "full": 0, "token_loads": 0, "desired_alone": 0}

        # Registered after the start: the first miss loads every token once, for both.
        late = [_register(cs, "agent", f"late-{n}") for n in range(2)]
        for c in late:
            _beat(cs, c)
        counts = _counts(cs)
        assert counts["lean"] == 4 and counts["full"] == 0 and counts["token_loads"] == 1
