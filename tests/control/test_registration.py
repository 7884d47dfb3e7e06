"""Components register with the passphrase and get a certificate for mutual TLS."""

from __future__ import annotations

import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from siterecovery.pki import CertificateAuthority, client_context, server_context
from tests.conftest import SITERECOVERY, free_port, run_cli
from tests.control.conftest import ConfigServer, running_config_server


@pytest.fixture(scope="module")
def cs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ConfigServer]:
    """One server for the module (a start costs seconds): every test registers components of its
    own names, and what one test expects absent (a refused registration) is named by it alone."""
    with running_config_server(tmp_path_factory.mktemp("registration")) as server:
        yield server


def _register(cs: ConfigServer, passphrase: str, name: str = "ps-cloud") -> tuple[int, dict[str, str]]:
    resp = cs.api(
        "POST",
        "/api/components/register",
        token="",
        json={
            "passphrase": passphrase,
            "kind": "process-server",
            "name": name,
            "site": "cloud",
            "address": "127.0.0.1:9000",
        },
    )
    return resp.status_code, resp.json()


def _tls_echo_server(ctx: ssl.SSLContext) -> tuple[int, threading.Thread]:
    sock = socket.create_server(("127.0.0.1", 0))
    port = sock.getsockname()[1]

    def serve() -> None:
        with sock:
            conn, _ = sock.accept()
            try:
                with ctx.wrap_socket(conn, server_side=True) as tls:
                    tls.sendall(tls.recv(16))
            except (ssl.SSLError, OSError):
                pass

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    return port, t


def test_right_passphrase_yields_certificate_accepted_by_mtls_server(
    cs: ConfigServer, tmp_path: Path
) -> None:
    """Registration and mTLS; PS-2: the servers view shows the process server's site and health."""
    passphrase = run_cli("server", "passphrase", env=cs.env).stdout.strip()
    status, reg = _register(cs, passphrase)
    assert status == 201
    comp = tmp_path / "component"
    comp.mkdir()
    (comp / "c.crt").write_text(reg["cert_pem"])
    (comp / "c.key").write_text(reg["key_pem"])
    (comp / "ca.crt").write_text(reg["ca_pem"])
    # The project's mutual-TLS server (the data plane's listener context) accepts it.
    server_side = CertificateAuthority.load_or_create(cs.state_dir / "pki").issue("master-target:test")
    srv = tmp_path / "srv"
    cert, key, ca = server_side.write(srv, "mt")
    port, t = _tls_echo_server(server_context(cert, key, ca))
    ctx = client_context(comp / "c.crt", comp / "c.key", comp / "ca.crt")
    with (
        socket.create_connection(("127.0.0.1", port)) as raw,
        ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        tls.sendall(b"hello")
        assert tls.recv(16) == b"hello"
    t.join(5)
    # The component token heartbeats; the server now lists it as connected.
    hb = cs.api(
        "POST",
        f"/api/components/{reg['id']}/heartbeat",
        token=reg["token"],
        json={"stats": {"cache_used_bytes": 10, "cache_capacity_bytes": 100}},
    )
    assert hb.status_code == 200 and "desired" in hb.json()
    servers = {s["name"]: s for s in cs.api("GET", "/api/servers").json()}
    assert servers["ps-cloud"]["connected"] is True and servers["ps-cloud"]["site"] == "cloud"


def test_wrong_passphrase_is_refused_and_logged(cs: ConfigServer) -> None:
    status, body = _register(cs, "not-the-passphrase", "ps-refused")
    assert status == 403 and body["code"] == "passphrase-invalid"
    events = cs.api("GET", "/api/events", params={"code": "passphrase-invalid", "object_id": "ps-refused"})
    assert [e["code"] for e in events.json()] == ["passphrase-invalid"]
    assert all(s["name"] != "ps-refused" for s in cs.api("GET", "/api/servers").json())


def test_certificate_from_another_ca_is_refused(cs: ConfigServer, tmp_path: Path) -> None:
    ours = CertificateAuthority.load_or_create(cs.state_dir / "pki").issue("master-target:test")
    cert, key, ca = ours.write(tmp_path / "srv", "mt")
    port, t = _tls_echo_server(server_context(cert, key, ca))
    rogue = CertificateAuthority.load_or_create(tmp_path / "rogue-ca").issue("intruder")
    rc, rk, _ = rogue.write(tmp_path / "rogue", "intruder")
    ctx = client_context(rc, rk, ca)  # trusts our CA, but presents a rogue certificate
    refused = False
    try:
        with (
            socket.create_connection(("127.0.0.1", port)) as raw,
            ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
        ):
            tls.sendall(b"hello")
            refused = tls.recv(16) != b"hello"
    except (ssl.SSLError, OSError):
        refused = True
    t.join(5)
    assert refused


def test_process_server_cache_alerts(cs: ConfigServer) -> None:
    passphrase = cs.api("GET", "/api/server/passphrase").json()["passphrase"]
    _, reg = _register(cs, passphrase, "ps-alert")

    def beat(used: int) -> None:
        cs.api(
            "POST",
            f"/api/components/{reg['id']}/heartbeat",
            token=reg["token"],
            json={"stats": {"cache_used_bytes": used, "cache_capacity_bytes": 100}},
        )

    beat(72)  # 28 % free: warning
    alerts = [
        e for e in cs.api("GET", "/api/events?alerts=true&active=true").json() if e["code"] == "ps-cache-low"
    ]
    assert [a["severity"] for a in alerts] == ["warning"]
    beat(80)  # 20 % free: critical, same alert escalated
    alerts = [
        e for e in cs.api("GET", "/api/events?alerts=true&active=true").json() if e["code"] == "ps-cache-low"
    ]
    assert [a["severity"] for a in alerts] == ["critical"]
    beat(10)
    assert not [
        e for e in cs.api("GET", "/api/events?alerts=true&active=true").json() if e["code"] == "ps-cache-low"
    ]


def test_diagnose_connectivity_reports_process_server_heartbeats(cs: ConfigServer) -> None:
    """PS-3: TCP to the API port plus heartbeat age, judged per process server."""
    passphrase = cs.api("GET", "/api/server/passphrase").json()["passphrase"]
    _, reg = _register(cs, passphrase, "ps-near")
    cs.api("POST", f"/api/components/{reg['id']}/heartbeat", token=reg["token"], json={"stats": {}})
    ok = run_cli("diagnose", "connectivity", "--process-server", "ps-near", env=cs.env)
    assert (
        "reachable" in ok.stdout
        and "ps-near (cloud): last heartbeat" in ok.stdout
        and "connected" in ok.stdout
    )
    _register(cs, passphrase, "ps-silent")  # registered, never heartbeated
    silent = run_cli("diagnose", "connectivity", "--process-server", "ps-silent", env=cs.env, check=False)
    assert silent.returncode == 1 and "never" in silent.stdout and "DISCONNECTED" in silent.stdout
    down = run_cli("diagnose", "connectivity", "--server", "http://127.0.0.1:9", env=cs.env, check=False)
    assert down.returncode == 1 and "unreachable" in down.stderr


def test_heartbeat_keeps_a_moved_listener_address_current(cs: ConfigServer) -> None:
    """A master target restarted on another port (same identity) is found at its new address."""
    passphrase = cs.api("GET", "/api/server/passphrase").json()["passphrase"]
    reg = cs.api(
        "POST",
        "/api/components/register",
        token="",
        json={
            "passphrase": passphrase,
            "kind": "master-target",
            "name": "mt-moved",
            "os_type": "linux",
            "address": "127.0.0.1:7001",
        },
    ).json()
    cs.api(
        "POST",
        f"/api/components/{reg['id']}/heartbeat",
        token=reg["token"],
        json={"stats": {}, "address": "127.0.0.1:7002"},
    )
    assert cs.api("GET", "/api/servers/mt-moved").json()["address"] == "127.0.0.1:7002"


def test_process_server_and_master_target_name_their_vm_with_machine(
    cs: ConfigServer, tmp_path: Path
) -> None:
    """Real component processes register with `--machine`: before, a master target was bound to its
    VM only by being named after it, and a process server could not name one at all."""
    passphrase = tmp_path / "passphrase"
    passphrase.write_text(cs.api("GET", "/api/server/passphrase").json()["passphrase"])
    common = ["--server", cs.url, "--passphrase-file", str(passphrase), "--site", "onprem"]
    commands = {
        "mt-svc": [
            "master-target", "--os", "linux", "--name", "mt-svc", "--machine", "mt-vm-7",
            "--state-dir", str(tmp_path / "mt"), "--retention-volume", str(tmp_path / "ret"),
            "--listen", f"127.0.0.1:{free_port()}",
        ],
        "ps-svc": [
            "process-server", "--name", "ps-svc", "--machine", "ps-vm-3",
            "--cache-dir", str(tmp_path / "ps"), "--listen", f"127.0.0.1:{free_port()}",
        ],
    }  # fmt: skip
    procs = [
        subprocess.Popen(
            [SITERECOVERY, *args, *common],
            stdout=subprocess.DEVNULL,
            stderr=open(tmp_path / f"{name}.log", "wb"),  # noqa: SIM115
            start_new_session=True,
        )
        for name, args in commands.items()
    ]
    try:
        deadline = time.monotonic() + 90
        machines: dict[str, str] = {}
        while len(machines) < 2:
            assert time.monotonic() < deadline, [(tmp_path / f"{n}.log").read_text() for n in commands]
            for name in commands:
                got = cs.api("GET", f"/api/servers/{name}")
                if got.status_code == 200:
                    machines[name] = got.json()["machine"]
            time.sleep(0.2)
        assert machines == {"mt-svc": "mt-vm-7", "ps-svc": "ps-vm-3"}
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
