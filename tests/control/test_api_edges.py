"""The API's edges against a real server process: hostile input gets a 4xx with a code, never a 500.

F1 bad fabric connections, F2 bad heartbeat stats, A1 the token checked before the body is read,
the body limit, 405 with Allow, and the error responses declared in /openapi.json.
"""

from __future__ import annotations

import json
import socket
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import run_cli
from tests.control.conftest import ConfigServer, running_config_server

BODY_LIMIT = 1024 * 1024


@pytest.fixture(scope="module")
def edge(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ConfigServer]:
    """One server for the module, with a 1 MiB body limit."""
    limit = {"SITERECOVERY_MAX_BODY_BYTES": str(BODY_LIMIT)}
    with running_config_server(tmp_path_factory.mktemp("edge"), limit) as server:
        yield server


def _problem(resp: httpx.Response, status: int) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith("application/problem+json")
    body: dict[str, Any] = resp.json()
    return body


@pytest.mark.parametrize(
    ("kind", "connection", "field"),
    [
        pytest.param("lab", {"path": "\u0000"}, "connection.path", id="nul-path"),
        pytest.param("lab", {"path": "/tmp/" + "a" * 5000}, "connection.path", id="5000-char-path"),
        pytest.param("lab", {"path": "/" + "b" * 300}, "connection.path", id="component-too-long"),
        pytest.param(
            "vsphere", {"host": "127.0.0.1", "user": "u", "port": "abc"}, "connection.port", id="port-abc"
        ),
        pytest.param(
            "vsphere", {"host": "127.0.0.1", "user": "u", "port": 70000}, "connection.port", id="port-range"
        ),
        pytest.param("vsphere", {"host": "127.0.0.1"}, "connection.user", id="no-user"),
        pytest.param("lab", {"path": "/x", "colour": "blue"}, "connection.colour", id="unknown-key"),
        pytest.param(
            "azure",
            {
                "subscription": "1",
                "resource_group": "rg",
                "location": "westeurope",
                "storage_account": "evil.example/x#",
                "subnet_id": "/subscriptions/1/subnets/a",
            },
            "connection.storage_account",
            id="azure-account-not-a-name",
        ),
        pytest.param("libvirt", {"uri": "not a uri"}, "connection.uri", id="libvirt-uri-not-a-uri"),
        pytest.param(
            "libvirt",
            {"uri": "qemu:///system", "domain_type": "xen"},
            "connection.domain_type",
            id="libvirt-type",
        ),
    ],
)
def test_f1_bad_fabric_connection_is_422_naming_the_field(
    edge: ConfigServer, kind: str, connection: dict[str, Any], field: str
) -> None:
    resp = edge.api("POST", "/api/fabrics", json={"name": "f1", "kind": kind, "connection": connection})
    body = _problem(resp, 422)
    assert body["code"] == "invalid-input" and body["detail"]["field"] == field
    assert all(f["name"] != "f1" for f in edge.api("GET", "/api/fabrics").json())


def test_f1_a_lab_path_that_is_not_a_lab_is_a_problem_not_a_500(edge: ConfigServer, tmp_path: Path) -> None:
    not_a_lab = tmp_path / "inventory-is-garbage"
    not_a_lab.mkdir()
    (not_a_lab / "inventory.json").write_text("{not json")
    for path in (str(not_a_lab), str(tmp_path / "missing"), "/proc/self/mem"):
        resp = edge.api(
            "POST", "/api/fabrics", json={"name": "f1b", "kind": "lab", "connection": {"path": path}}
        )
        assert resp.status_code in (409, 422, 503), resp.text
        assert resp.headers["content-type"].startswith("application/problem+json")


def _register(cs: ConfigServer, kind: str, name: str) -> dict[str, Any]:
    passphrase = cs.api("GET", "/api/server/passphrase").json()["passphrase"]
    body = {"passphrase": passphrase, "kind": kind, "name": name, "address": "127.0.0.1:9000"}
    resp = cs.api("POST", "/api/components/register", token="", json=body)
    assert resp.status_code == 201, resp.text
    out: dict[str, Any] = resp.json()
    return out


@pytest.fixture(scope="module")
def components(edge: ConfigServer) -> dict[str, tuple[str, str]]:
    """(id, token) of a registered component of each kind."""
    out = {}
    for kind in ("process-server", "master-target", "agent"):
        reg = _register(edge, kind, f"f2-{kind}")
        out[kind] = (reg["id"], reg["token"])
    return out


@pytest.mark.parametrize(
    ("kind", "stats", "field"),
    [
        pytest.param(
            "process-server", {"cache_capacity_bytes": "abc"}, "stats.cache_capacity_bytes", id="abc"
        ),
        pytest.param("process-server", {"cache_used_bytes": "5"}, "stats.cache_used_bytes", id="string-int"),
        pytest.param("process-server", {"cache_used_bytes": -1}, "stats.cache_used_bytes", id="negative"),
        pytest.param(
            "process-server", {"throughput_bytes_per_s": {}}, "stats.throughput_bytes_per_s", id="dict"
        ),
        pytest.param("process-server", {"cache_used_bytes": 10**30}, "stats.cache_used_bytes", id="huge"),
        pytest.param("process-server", {"colour": 1}, "stats.colour", id="unknown-field"),
        pytest.param("master-target", {"pairs": "x"}, "stats.pairs", id="pairs-x"),
        pytest.param("master-target", {"attached_disks": "many"}, "stats.attached_disks", id="disks-many"),
        pytest.param(
            "master-target",
            {"pairs": [{"pair_id": "p", "applied_seq": 1.5}]},
            "stats.pairs.0.applied_seq",
            id="float-seq",
        ),
        pytest.param(
            "agent", {"pairs": [{"pair_id": "p", "state": "nonsense"}]}, "stats.pairs.0.state", id="bad-enum"
        ),
    ],
)
def test_f2_bad_heartbeat_stats_are_422_and_not_stored(
    edge: ConfigServer, components: dict[str, tuple[str, str]], kind: str, stats: dict[str, Any], field: str
) -> None:
    comp_id, token = components[kind]
    url = f"/api/components/{comp_id}/heartbeat"
    good = {"cache_used_bytes": 10, "cache_capacity_bytes": 100} if kind == "process-server" else {}
    assert edge.api("POST", url, token=token, json={"stats": good}).status_code == 200

    body = _problem(edge.api("POST", url, token=token, json={"stats": stats}), 422)
    assert field in [p["detail"]["field"] for p in body["problems"]], body
    assert edge.api("GET", f"/api/servers/{comp_id}").json()["stats"] == good
    # Nothing a component sends can break the scrape or the portal.
    assert edge.api("GET", "/metrics", token="").status_code == 200
    page = httpx.get(edge.url + "/infrastructure", cookies={"siterecovery_session": edge.token}, timeout=30)
    assert page.status_code == 200 and f"f2-{kind}" in page.text


def test_f2_non_finite_numbers_are_refused(edge: ConfigServer) -> None:
    reg = _register(edge, "process-server", "f2-nan")
    url = f"{edge.url}/api/components/{reg['id']}/heartbeat"
    for raw in (
        b'{"stats": {"throughput_bytes_per_s": NaN}}',
        b'{"stats": {"cache_free_percent": Infinity}}',
    ):
        resp = httpx.post(
            url,
            content=raw,
            headers={"Authorization": f"Bearer {reg['token']}", "content-type": "application/json"},
            timeout=30,
        )
        assert resp.status_code == 422, resp.text
    assert edge.api("GET", "/metrics", token="").status_code == 200


def _raw_request(cs: ConfigServer, head: str, body_part: bytes) -> bytes:
    """Send the request line, headers and only a part of the body; return what the server answers.

    A server that wants the whole body first never answers before the timeout."""
    with socket.create_connection(("127.0.0.1", cs.port), timeout=30) as sock:
        sock.sendall(head.encode() + body_part)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
        # The rest of the answer (its body) may follow in another segment.
        sock.settimeout(5)
        try:
            while chunk := sock.recv(65536):
                data += chunk
        except TimeoutError:
            pass
        return data


def test_a1_token_is_checked_before_the_body_is_read(edge: ConfigServer) -> None:
    size = 64 * 1024 * 1024
    head = (
        "POST /api/policies HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {size}\r\nConnection: close\r\n\r\n"
    )
    answer = _raw_request(edge, head, b'{"name": "' + b"a" * 1024)
    status_line, _, rest = answer.partition(b"\r\n")
    assert status_line.startswith(b"HTTP/1.1 401"), answer[:300]
    assert b"application/problem+json" in rest and b'"code":"unauthenticated"' in rest
    # The same for a token that is not ours, and the body limit refuses even a valid token's
    # oversized body unread.
    answer = _raw_request(edge, head.replace("Host:", "Authorization: Bearer sr_nope\r\nHost:"), b"{")
    assert answer.startswith(b"HTTP/1.1 401") and b'"code":"token-unknown"' in answer
    answer = _raw_request(edge, head.replace("Host:", f"Authorization: Bearer {edge.token}\r\nHost:"), b"{")
    assert answer.startswith(b"HTTP/1.1 413") and b'"code":"body-too-large"' in answer


def test_body_without_length_is_cut_off_at_the_limit(edge: ConfigServer) -> None:
    def chunks() -> Iterator[bytes]:
        yield b'{"name": "big", "x": "'
        for _ in range(3 * BODY_LIMIT // 65536):
            yield b"a" * 65536
        yield b'"}'

    resp = httpx.post(
        edge.url + "/api/policies",
        content=chunks(),
        headers={"Authorization": f"Bearer {edge.token}", "content-type": "application/json"},
        timeout=60,
    )
    assert _problem(resp, 413)["code"] == "body-too-large"
    assert edge.api("POST", "/api/policies", json={"name": "small"}).status_code == 201


def test_unsupported_method_is_405_with_allow(edge: ConfigServer) -> None:
    resp = edge.api("TRACE", "/api/policies")
    body = _problem(resp, 405)
    assert body["code"] == "method-not-allowed"
    assert (
        {"GET", "POST"} <= set(resp.headers["allow"].replace(" ", "").split(",")) <= {"GET", "HEAD", "POST"}
    )


def test_openapi_declares_every_error_as_problem_json(edge: ConfigServer) -> None:
    spec = httpx.get(edge.url + "/openapi.json", timeout=30).json()
    assert "Problem" in spec["components"]["schemas"]
    checked = 0
    for path, operations in spec["paths"].items():
        for method, op in operations.items():
            needed = {"404", "409", "413", "422"} | ({"401", "403"} if path not in ("/api/ca",) else set())
            if not path.startswith("/api/") or path == "/api/components/register":
                needed -= {"401", "403"}
            for status in needed:
                content = op["responses"][status]["content"]
                assert list(content) == ["application/problem+json"], (method, path, status)
                assert content["application/problem+json"]["schema"] == {
                    "$ref": "#/components/schemas/Problem"
                }
                checked += 1
    assert checked > 200
    assert "429" in spec["paths"]["/api/components/register"]["post"]["responses"]
    assert json.dumps(spec).count("HTTPValidationError") == 0


def test_expired_and_revoked_tokens_are_refused_with_a_code(edge: ConfigServer) -> None:
    created = run_cli("-o", "json", "tokens", "create", "--role", "reader", "--name", "short", env=edge.env)
    short = json.loads(created.stdout)
    # The default lifetime is the server's 30 days; --expires-in overrides it.
    assert 29 * 86400 < short["expires_at"] - time.time() <= 30 * 86400
    hourly = json.loads(
        run_cli(
            "-o", "json", "tokens", "create", "--role", "reader", "--expires-in", "1h", env=edge.env
        ).stdout
    )
    assert 3500 < hourly["expires_at"] - time.time() <= 3600
    assert edge.api("GET", "/api/policies", token=short["token"]).status_code == 200
    assert edge.api("GET", "/api/policies", token=hourly["token"]).status_code == 200
    # Expiry is the clock passing `expires_at`: move it into the past rather than wait for it.
    with sqlite3.connect(edge.state_dir / "siterecovery.db") as db:
        db.execute("update tokens set expires_at = ? where id = ?", (time.time() - 1, short["id"]))
    listed = {t["id"]: t for t in edge.api("GET", "/api/tokens").json()}
    assert listed[short["id"]]["expired"] is True and listed[hourly["id"]]["expired"] is False

    # Both tokens are remembered as verified (`token_cache_seconds`), so the edit behind the
    # server's back would be seen only within that time; a revoke through the API voids every
    # remembered token at once: the revoked one and the expired one are refused on the next request.
    run_cli("tokens", "revoke", hourly["id"], env=edge.env)
    revoked = _problem(edge.api("GET", "/api/policies", token=hourly["token"]), 401)
    assert revoked["code"] == "token-revoked"
    expired = _problem(edge.api("GET", "/api/policies", token=short["token"]), 401)
    assert expired["code"] == "token-expired"
    listing = run_cli("tokens", "list", env=edge.env).stdout
    assert hourly["id"] in listing and "never" in listing  # the initial admin token does not expire
    assert time.strftime("%Y-%m-%d", time.gmtime(hourly["expires_at"])) in listing
    # The caller's own token cannot lock it out.
    me = next(t for t in edge.api("GET", "/api/tokens").json() if t["name"] == "initial admin")
    assert _problem(edge.api("POST", f"/api/tokens/{me['id']}/revoke"), 409)["code"] == "token-in-use"
    assert _problem(edge.api("POST", "/api/tokens/tok_nope/revoke"), 404)["code"] == "not-found"
    assert any(e["code"] == "token-revoked" for e in edge.api("GET", "/api/events").json())


def test_wrong_passphrases_are_rate_limited_per_address(cs: ConfigServer) -> None:
    passphrase = cs.api("GET", "/api/server/passphrase").json()["passphrase"]

    def register(secret: str) -> httpx.Response:
        body = {"passphrase": secret, "kind": "process-server", "name": "ps-guess", "address": "127.0.0.1:9"}
        return cs.api("POST", "/api/components/register", token="", json=body)

    for _ in range(5):
        assert _problem(register("wrong"), 403)["code"] == "passphrase-invalid"
    throttled = register(passphrase)  # even the right one, while the address is throttled
    assert _problem(throttled, 429)["code"] == "too-many-attempts"
    assert 1 <= int(throttled.headers["retry-after"]) <= 60
    alerts = cs.api("GET", "/api/events?alerts=true&active=true").json()
    assert [a["object_id"] for a in alerts if a["code"] == "passphrase-attempts-throttled"] == ["127.0.0.1"]
    assert all(s["name"] != "ps-guess" for s in cs.api("GET", "/api/servers").json())


def test_json_nested_too_deep_is_a_400_problem(edge: ConfigServer) -> None:
    resp = edge.api(
        "POST", "/api/policies", content=b"[" * 100_000, headers={"content-type": "application/json"}
    )
    assert _problem(resp, 400)["code"] == "body-unparseable"
