"""The API over HTTPS: components verify the configuration server, and pin it after registering."""

from __future__ import annotations

import http.server
import ssl
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from cryptography import x509

from siterecovery.dataplane.assignments import AgentStats
from siterecovery.dataplane.control_client import ControlClient, Registration
from siterecovery.errors import SiteRecoveryError
from siterecovery.pki import CertificateAuthority
from tests.conftest import SITERECOVERY, free_port, run_cli
from tests.control.conftest import ConfigServer


@pytest.fixture(scope="module")
def tls_cs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ConfigServer]:
    """One HTTPS server for the module (a start costs seconds): the tests register agents (a
    second registration of a name is the product's re-registration) and look for their own names."""
    tmp = tmp_path_factory.mktemp("tls")
    server = ConfigServer(
        state_dir=tmp / "state",
        port=free_port(),
        log=tmp / "server.log",
        tls=True,
        tls_names=("cs.dr.example", "192.0.2.10"),
    )
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def impostor(tmp_path: Path) -> Iterator[str]:
    """An HTTPS server on 127.0.0.1 with a valid-looking certificate from another CA."""
    other = CertificateAuthority.load_or_create(tmp_path / "impostor-ca")
    cert, key, _ = other.issue("configuration-server", ("127.0.0.1", "localhost")).write(
        tmp_path / "impostor", "server"
    )
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    httpd.socket = ctx.wrap_socket(httpd.socket, server_side=True)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"https://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


def _agent(cs: ConfigServer, state: Path, ca_file: Path | None = None) -> ControlClient:
    return ControlClient(
        cs.url, state, Registration("agent", "onprem/web9", "onprem", machine="web9"), ca_file
    )


def _passphrase(cs: ConfigServer) -> str:
    return run_cli("server", "passphrase", env=cs.env).stdout.strip()


def test_component_verifies_the_server_with_its_ca(tls_cs: ConfigServer, tmp_path: Path) -> None:
    client = _agent(tls_cs, tmp_path / "agent", tls_cs.ca_file)
    client.register(_passphrase(tls_cs))
    assert isinstance(client.heartbeat(AgentStats()), dict)
    client.close()
    names = [c["name"] for c in tls_cs.api("GET", "/api/servers").json()]
    assert "onprem/web9" in names
    # A 2 MiB body over TLS (many records, many reads of uvloop's TLS transport) is read whole,
    # its last field named in the answer.
    body = {"passphrase": "x", "kind": "agent", "name": "onprem/big", "padding": "p" * (2 << 20)}
    refused = tls_cs.api("POST", "/api/components/register", token="", json=body)
    assert refused.status_code == 422 and "padding" in refused.text, refused.text[:300]


def test_a_server_with_another_ca_never_sees_the_passphrase(
    tls_cs: ConfigServer, impostor: str, tmp_path: Path
) -> None:
    client = _agent(tls_cs, tmp_path / "agent", tls_cs.ca_file)
    client.server = impostor
    with pytest.raises(SiteRecoveryError) as refused:
        client.register(_passphrase(tls_cs))
    assert refused.value.first.code == "server-certificate-untrusted"
    assert "--ca-file" in refused.value.first.remediation
    assert not client.identity.exists()

    # The same refusal from a real component process, which exits with the code and changes nothing.
    (tmp_path / "pw").write_text(_passphrase(tls_cs) + "\n")
    proc = subprocess.run(
        [
            SITERECOVERY,
            "process-server",
            "--server",
            impostor,
            "--ca-file",
            str(tls_cs.ca_file),
            "--passphrase-file",
            str(tmp_path / "pw"),
            "--cache-dir",
            str(tmp_path / "ps"),
            "--listen",
            "127.0.0.1:0",
            "--name",
            "ps-x",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2 and "server-certificate-untrusted" in proc.stderr, proc.stderr
    assert "ps-x" not in [c["name"] for c in tls_cs.api("GET", "/api/servers").json()]


def test_registration_pins_the_servers_ca(tls_cs: ConfigServer, impostor: str, tmp_path: Path) -> None:
    client = _agent(tls_cs, tmp_path / "agent")  # no CA given: trust on first use
    client.register(_passphrase(tls_cs))
    real = client.server
    client.server = impostor
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        client.heartbeat(AgentStats())
    client.server = real
    assert isinstance(client.heartbeat(AgentStats()), dict)
    client.close()
    # After a restart the component still trusts only that CA.
    again = _agent(tls_cs, tmp_path / "agent")
    again.register("not needed: the saved registration is reused")
    again.server = impostor
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        again.heartbeat(AgentStats())


def test_certificate_covers_the_names_components_use(tls_cs: ConfigServer) -> None:
    pem = ssl.get_server_certificate(("127.0.0.1", tls_cs.port))
    sans = x509.load_pem_x509_certificate(pem.encode()).extensions.get_extension_for_class(
        x509.SubjectAlternativeName
    )
    names = {str(n) for n in sans.value.get_values_for_type(x509.DNSName)}
    ips = {str(n) for n in sans.value.get_values_for_type(x509.IPAddress)}
    assert {"cs.dr.example", "localhost"} <= names
    assert {"192.0.2.10", "127.0.0.1"} <= ips
