"""Component certificates (issue 13): named by kind and id, short-lived, renewed, revoked at removal.

A real configuration server and a real process server registered with it: the certificate names
the component in its SAN URI, a certificate near its end is renewed over the API by the running
component (which then presents the new one), and `servers remove` revokes it: its token and
certificate are refused by the API and its serial reaches every other hop's desired state.
"""

from __future__ import annotations

import datetime as dt
import json
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from siterecovery.dataplane.links import Identity
from siterecovery.pki import CertificateAuthority
from tests.conftest import SITERECOVERY, run_cli
from tests.control.conftest import ConfigServer, running_config_server
from tests.dataplane.conftest import wait_for


@pytest.fixture(scope="module")
def cs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ConfigServer]:
    """One server for the module (a start costs seconds): the two tests register components of
    their own names and count only events about them."""
    with running_config_server(tmp_path_factory.mktemp("certificates")) as server:
        yield server


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _uris(cert: x509.Certificate) -> list[str]:
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return list(san.get_values_for_type(x509.UniformResourceIdentifier))


def _csr(key_path: Path) -> x509.CertificateSigningRequest:
    key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return x509.CertificateSigningRequestBuilder().subject_name(x509.Name([])).sign(key, hashes.SHA256())


def _start_ps(cs: ConfigServer, root: Path, passphrase_file: Path) -> subprocess.Popen[bytes]:
    with open(root / "ps.log", "ab") as log:
        return subprocess.Popen(
            [SITERECOVERY, "process-server", "--server", cs.url, "--passphrase-file", str(passphrase_file),
             "--cache-dir", str(root / "ps"), "--listen", "127.0.0.1:0", "--name", "ps-a", "--site", "cloud",
             "--interval", "0.3"],
            stdout=log,
            stderr=subprocess.STDOUT,
        )  # fmt: skip


def _served_serial(address: str, client: Identity) -> int:
    """The serial of the certificate the process server presents now."""
    host, port = address.rsplit(":", 1)
    with (
        socket.create_connection((host, int(port)), timeout=10) as raw,
        client.client_context().wrap_socket(raw, server_hostname=host) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)


def test_certificate_is_renewed_by_the_running_component_and_revoked_at_removal(
    cs: ConfigServer, tmp_path: Path
) -> None:
    passphrase = tmp_path / "passphrase"
    passphrase.write_text(cs.api("GET", "/api/server/passphrase").json()["passphrase"])
    state = tmp_path / "ps"
    ident = Identity.in_dir(state)
    proc = _start_ps(cs, tmp_path, passphrase)
    try:
        wait_for(lambda: (state / "stats.json").exists(), 60, "the process server to register")
        ps_id = cs.api("GET", "/api/servers/ps-a").json()["id"]
        first = _cert(ident.cert)
        assert _uris(first) == [f"urn:siterecovery:process-server:{ps_id}"]
        assert first.not_valid_after_utc - first.not_valid_before_utc == dt.timedelta(days=7)
        _stop(proc)

        # Six of its seven days gone (same key, signed by the server's CA): due for renewal.
        ca = CertificateAuthority.load_or_create(cs.state_dir / "pki")
        start = dt.datetime.now(dt.UTC) - dt.timedelta(days=6)
        old = ca.sign_csr(
            _csr(ident.key), "old", ("127.0.0.1",), "process-server", ps_id, dt.timedelta(days=7), start
        )
        ident.cert.write_bytes(old.public_bytes(serialization.Encoding.PEM))
        proc = _start_ps(cs, tmp_path, passphrase)
        wait_for(lambda: _cert(ident.cert).serial_number != old.serial_number, 60, "the renewal")
        renewed = _cert(ident.cert)
        assert _uris(renewed) == [f"urn:siterecovery:process-server:{ps_id}"]
        assert renewed.not_valid_after_utc > dt.datetime.now(dt.UTC) + dt.timedelta(days=6)
        # The running listener presents the renewed certificate (its context was reloaded).
        client_dir = tmp_path / "client"
        Identity.in_dir(client_dir).write(ca.issue("agent:x", kind="agent", component_id="x"))
        address = (state / "address").read_text().strip()
        assert _served_serial(address, Identity.in_dir(client_dir)) == renewed.serial_number

        # A certificate from before they named their component (CN only, 825 days) is replaced at once.
        _stop(proc)
        legacy = ca.sign_csr(
            _csr(ident.key), "process-server:ps-a", ("127.0.0.1",), "", "", dt.timedelta(days=825)
        )
        ident.cert.write_bytes(legacy.public_bytes(serialization.Encoding.PEM))
        proc = _start_ps(cs, tmp_path, passphrase)
        wait_for(lambda: _cert(ident.cert).serial_number != legacy.serial_number, 60, "the legacy renewal")
        renewed = _cert(ident.cert)
        assert _uris(renewed) == [f"urn:siterecovery:process-server:{ps_id}"]

        token = json.loads((state / "registration.json").read_text())["token"]
        renew_body = {
            "cert_pem": ident.cert.read_text(),
            "csr_pem": _csr(ident.key).public_bytes(serialization.Encoding.PEM).decode(),
        }
        # Another component's certificate (even the same CA's) does not renew this one.
        foreign = ca.issue("agent:x", kind="agent", component_id="agent-x")
        resp = cs.api(
            "POST", f"/api/components/{ps_id}/certificate", token=token,
            json={**renew_body, "cert_pem": foreign.cert_pem.decode()},
        )  # fmt: skip
        assert resp.status_code == 403 and resp.json()["code"] == "certificate-refused"

        # A master target registered beside it, to see what the other hops are told.
        mt = cs.api(
            "POST", "/api/components/register", token="",
            json={"passphrase": passphrase.read_text(), "kind": "master-target", "name": "mt-a"},
        ).json()  # fmt: skip
        removed = run_cli("-o", "json", "servers", "remove", "ps-a", env=cs.env)
        revoked = json.loads(removed.stdout)["revoked"]
        assert format(renewed.serial_number, "x") in revoked and format(first.serial_number, "x") in revoked
        hb = cs.api("POST", f"/api/components/{mt['id']}/heartbeat", token=mt["token"], json={"stats": {}})
        assert set(revoked) <= set(hb.json()["desired"]["revoked"])
        # The API refuses the removed component's token and certificate.
        gone = cs.api("POST", f"/api/components/{ps_id}/heartbeat", token=token, json={"stats": {}})
        assert gone.status_code == 401
        again = cs.api("POST", f"/api/components/{ps_id}/certificate", token=token, json=renew_body)
        assert again.status_code == 401
        assert all(s["name"] != "ps-a" for s in cs.api("GET", "/api/servers").json())
        assert any(e["code"] == "component-removed" for e in cs.api("GET", "/api/events").json())
    finally:
        _stop(proc)


def test_refusals_reported_by_a_hop_become_events_naming_the_peer(cs: ConfigServer) -> None:
    passphrase = cs.api("GET", "/api/server/passphrase").json()["passphrase"]
    reg = cs.api(
        "POST", "/api/components/register", token="",
        json={"passphrase": passphrase, "kind": "process-server", "name": "ps-r"},
    ).json()  # fmt: skip
    refusal = {
        "number": 1, "time": time.time(), "peer": "agent:agent-evil", "address": "10.0.0.9:4242",
        "pair_id": "item-1.g1.d0", "code": "peer-not-authorised", "message": "not assigned",
    }  # fmt: skip
    stats = {
        "cache_used_bytes": 0, "cache_capacity_bytes": 100, "cache_free_percent": 100.0, "cache_health": "ok",
        "backlog_bytes": 0, "throughput_bytes_per_s": 0.0, "drain_seconds": None, "pairs": 0,
        "refused_peers": [refusal],
    }  # fmt: skip
    for _ in range(2):  # reported twice, recorded once
        path = f"/api/components/{reg['id']}/heartbeat"
        beat = cs.api("POST", path, token=reg["token"], json={"stats": stats})
        assert beat.status_code == 200
    events = [e for e in cs.api("GET", "/api/events").json() if e["code"] == "peer-refused"]
    assert len(events) == 1
    assert "agent:agent-evil" in events[0]["message"] and "10.0.0.9" in events[0]["message"]
