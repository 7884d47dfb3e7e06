"""The heartbeat's lean path (`control.api.heartbeat_front`) keeps the route's contract.

Against a real server on loopback: every heartbeat answered by the lean path (a JSON content
type and a remembered token) gets exactly the answer the full FastAPI stack gives the same
request (sent with a `+json` content type, which FastAPI parses as JSON and the lean path leaves
to it) — wrong component's token, a user's token, bad JSON, bad fields, bad statistics, nesting
too deep; a revoked token is refused; a shed heartbeat is 503 with Retry-After before its token
is looked at; the route is still in the OpenAPI document. In process: the lean path is the one
that answers a remembered component's heartbeat.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from siterecovery.config import load_server_config
from siterecovery.control.api.components import COUNTS
from siterecovery.server.app import create_app
from siterecovery.store.context import open_control_plane
from tests.control.conftest import ConfigServer, running_config_server

LEAN = "application/json"
FULL = "application/vnd.siterecovery.test+json"  # JSON to FastAPI, not taken by the lean path


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ConfigServer]:
    """One server for the module, one heartbeat at a time (so a held heartbeat sheds the next)."""
    concurrency = {"SITERECOVERY_HEARTBEAT_CONCURRENCY": "1"}
    with running_config_server(tmp_path_factory.mktemp("front"), concurrency) as cs:
        yield cs


def _register(cs: ConfigServer, kind: str, name: str) -> tuple[str, str]:
    passphrase = cs.api("GET", "/api/server/passphrase").json()["passphrase"]
    body = {"passphrase": passphrase, "kind": kind, "name": name, "site": "onprem", "address": "127.0.0.1:9"}
    reg = cs.api("POST", "/api/components/register", token="", json=body)
    assert reg.status_code == 201, reg.text
    return reg.json()["id"], reg.json()["token"]


def _beat(cs: ConfigServer, component_id: str, token: str, body: bytes, content_type: str) -> httpx.Response:
    headers = {"content-type": content_type}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    url = f"{cs.url}/api/components/{component_id}/heartbeat"
    return httpx.post(url, content=body, headers=headers, timeout=30)


def _same_answer(cs: ConfigServer, component_id: str, token: str, body: bytes) -> httpx.Response:
    """The lean path's answer, after checking the full stack answers the same."""
    lean = _beat(cs, component_id, token, body, LEAN)
    full = _beat(cs, component_id, token, body, FULL)
    assert lean.status_code == full.status_code, (lean.text, full.text)
    assert lean.headers["content-type"] == full.headers["content-type"]
    if lean.status_code == 200:  # the time differs; the rest of the reply may not
        lean_reply, full_reply = lean.json(), full.json()
        assert lean_reply.pop("server_time") > 0 and full_reply.pop("server_time") > 0
        assert lean_reply == full_reply
    else:
        assert lean.json() == full.json()
    return lean


def test_the_lean_path_answers_as_the_route_does(server: ConfigServer) -> None:
    agent, agent_token = _register(server, "agent", "front-agent")
    other, _ = _register(server, "agent", "front-other")
    ps, ps_token = _register(server, "process-server", "front-ps")
    first = _beat(server, agent, agent_token, b'{"stats": {}}', LEAN)  # the first: the edge checks the token
    assert first.status_code == 200 and first.json()["desired"] is not None
    version = first.json()["desired_version"]

    idle = _same_answer(server, agent, agent_token, json.dumps({"desired_version": version}).encode())
    assert idle.json()["desired"] is None and idle.json()["desired_version"] == version
    changed = _same_answer(server, agent, agent_token, b'{"stats": {}, "desired_version": "old"}')
    assert changed.json()["desired"] == first.json()["desired"]
    assert _same_answer(server, ps, ps_token, b'{"stats": {}}').status_code == 200

    refusals: list[tuple[str, str, bytes, int, str]] = [
        (other, agent_token, b'{"stats": {}}', 403, "forbidden"),  # a component only heartbeats as itself
        (agent, server.token, b'{"stats": {}}', 403, "forbidden"),  # a user's token is not a component's
        (agent, agent_token, b'{"stats": ', 422, "invalid-input"),  # not JSON
        (agent, agent_token, b"", 422, "invalid-input"),  # no body
        (agent, agent_token, b"[1]", 422, "invalid-input"),  # not an object
        (agent, agent_token, b'{"stats": {}, "extra": 1}', 422, "invalid-input"),
        (agent, agent_token, b'{"desired_version": "' + b"v" * 65 + b'"}', 422, "invalid-input"),
        (
            agent,
            agent_token,
            b'{"stats": {"pairs": [{"pair_id": "p", "state": "nonsense"}]}}',
            422,
            "invalid-input",
        ),
        (agent, agent_token, b'{"stats": {"pairs": NaN}}', 422, "invalid-input"),
        (agent, agent_token, b"[" * 100_000, 400, "body-unparseable"),
        (agent, "not-a-token", b'{"stats": {}}', 401, "token-unknown"),
    ]
    for component_id, token, body, status, code in refusals:
        answer = _same_answer(server, component_id, token, body)
        assert answer.status_code == status, (body[:80], answer.text)
        assert answer.headers["content-type"].startswith("application/problem+json")
        problem = answer.json()
        assert problem["code"] == code and problem["message"] and problem["remediation"], problem
    bad_stats = _same_answer(
        server, agent, agent_token, b'{"stats": {"pairs": [{"pair_id": "p", "state": "nonsense"}]}}'
    )
    assert [p["detail"]["field"] for p in bad_stats.json()["problems"]] == ["stats.pairs.0.state"]
    # Two tokens: the first counts on either path (here the process server's: not this agent's).
    twice = [
        httpx.post(
            f"{server.url}/api/components/{agent}/heartbeat",
            content=b'{"stats": {}}',
            headers=[
                ("content-type", content_type),
                ("authorization", f"Bearer {ps_token}"),
                ("authorization", f"Bearer {agent_token}"),
            ],
            timeout=30,
        )
        for content_type in (LEAN, FULL)
    ]
    assert [r.status_code for r in twice] == [403, 403] and twice[0].json() == twice[1].json()
    # Still this component's token after all those refusals.
    assert _beat(server, agent, agent_token, b'{"stats": {}}', LEAN).status_code == 200

    # Registering again revokes the previous token: refused at once, on either path.
    _, new_token = _register(server, "agent", "front-agent")
    for content_type in (LEAN, FULL):
        revoked = _beat(server, agent, agent_token, b'{"stats": {}}', content_type)
        assert revoked.status_code == 401 and revoked.json()["code"] == "token-revoked", revoked.text
    assert _beat(server, agent, new_token, b'{"stats": {}}', LEAN).status_code == 200


def test_a_shed_heartbeat_is_refused_before_its_token_is_checked(server: ConfigServer) -> None:
    agent, token = _register(server, "agent", "front-held")
    assert _beat(server, agent, token, b'{"stats": {}}', LEAN).status_code == 200
    before = [e for e in server.api("GET", "/api/events").json() if e["code"] == "token-invalid"]
    # A heartbeat whose body never finishes holds the one slot (the server waits for the body).
    head = (
        f"POST /api/components/{agent}/heartbeat HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Authorization: Bearer {token}\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n"
    )
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as held:
        held.sendall(head.encode() + b'{"stats"')
        # Not even a token: refused as busy, not as unauthenticated (a shed request changes nothing).
        shed = httpx.post(
            f"{server.url}/api/components/{agent}/heartbeat",
            content=b'{"stats": {}}',
            headers={
                "content-type": LEAN,
                "Authorization": "Bearer not-a-token",
                "X-Heartbeat-Interval": "10",
            },
            timeout=30,
        )
        assert shed.status_code == 503, shed.text
        assert shed.json()["code"] == "server-busy" and shed.json()["remediation"]
        assert 10 <= int(shed.headers["retry-after"]) <= 15  # its interval, stretched while shedding
        # Other routes are not limited.
        assert server.api("GET", "/api/servers").status_code == 200
    # The held one gave up (its client went away): the slot is free again.
    assert _beat(server, agent, token, b'{"stats": {}}', LEAN).status_code == 200
    after = [e for e in server.api("GET", "/api/events").json() if e["code"] == "token-invalid"]
    assert len(after) == len(before)  # the shed request's token was never looked up


def test_the_server_serves_on_uvloop(server: ConfigServer) -> None:
    """The process serves heartbeats on uvloop's event loop (`server.main.uvicorn_settings`): its
    extension is mapped into the running server (uvicorn imports it only to run on it)."""
    assert server.proc is not None
    maps = Path(f"/proc/{server.proc.pid}/maps").read_text()
    assert "uvloop/loop." in maps
    assert _beat(server, *_register(server, "agent", "onprem/uv"), b'{"stats": {}}', LEAN).status_code == 200


def test_the_route_is_still_in_the_openapi_document(server: ConfigServer) -> None:
    spec = httpx.get(server.url + "/openapi.json", timeout=30).json()
    operation = spec["paths"]["/api/components/{component_id}/heartbeat"]["post"]
    assert operation["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/Heartbeat"
    }
    ok = operation["responses"]["200"]["content"]["application/json"]["schema"]
    assert ok == {"$ref": "#/components/schemas/HeartbeatReply"}
    for status in ("401", "403", "422"):
        assert list(operation["responses"][status]["content"]) == ["application/problem+json"]


def test_a_remembered_components_heartbeat_takes_the_lean_path(tmp_path: Path) -> None:
    cp = open_control_plane(load_server_config(tmp_path / "state"))
    try:
        app = create_app()
        with TestClient(app) as http:
            body = {"passphrase": cp.passphrase(), "kind": "agent", "name": "lean", "site": "onprem"}
            reg = http.post("/api/components/register", json=body).json()
            url, auth = f"/api/components/{reg['id']}/heartbeat", {"Authorization": f"Bearer {reg['token']}"}
            assert http.post(url, json={"stats": {}}, headers=auth).status_code == 200
            answered = COUNTS.lean
            for _ in range(3):
                reply = http.post(url, json={"stats": {}}, headers=auth)
                assert reply.status_code == 200 and reply.json()["desired_version"]
            assert COUNTS.lean == answered + 3
            refused = http.post(url, json={"stats": {}, "extra": 1}, headers=auth)
            assert refused.status_code == 422 and COUNTS.lean == answered + 3  # the route answered it
    finally:
        cp.db.engine.dispose()
