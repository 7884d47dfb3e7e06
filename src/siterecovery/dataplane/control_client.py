"""How a data-plane component gets its identity and desired state, and reports its stats.

With a configuration server: register once with the passphrase (the issued certificate and the
token are kept under the component's state directory and reused), then heartbeat `{"stats"}` and
receive `{"desired"}`. Over HTTPS the server's certificate must chain to the CA given with
`--ca-file`; without one, registration trusts the server on first use and every later call is
pinned to the CA registration returned (the server's own), so an impostor is refused from then on.
The certificate is short-lived: once a third of its life is left, the component renews it before
its next heartbeat (`POST /api/components/{id}/certificate`, its current certificate and a CSR for
the same key) and its TLS contexts present the new one from their next handshake.
Without a configuration server (`--assignments FILE`): the desired state is re-read from a JSON
file on every cycle and the certificate must already be in the state directory. Either way the
latest stats are also written to `<state_dir>/stats.json` for operators and tests.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import ssl
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, TypeVar

import httpx
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from pydantic import BaseModel

from siterecovery import pki
from siterecovery.config import COMPONENT_KEEP_ALIVE
from siterecovery.dataplane.links import Identity
from siterecovery.dataplane.point_delta import PointReports
from siterecovery.errors import Problem, SiteRecoveryError
from siterecovery.retry import after_busy

log = logging.getLogger(__name__)

D = TypeVar("D", bound=BaseModel)
RENEW_WHEN_LEFT = 1 / 3  # of the certificate's lifetime
# The heartbeat interval while something is changing (see `DesiredSource.pace`, docs/operations.md).
FAST_INTERVAL = 2.0


@dataclass(frozen=True)
class Registration:
    kind: str  # "agent" | "process-server" | "master-target"
    name: str
    site: str
    os_type: str | None = None
    address: str | None = None
    machine: str | None = None


class ControlClient:
    """Registration and heartbeats against the configuration server's component API."""

    def __init__(
        self, server: str, state_dir: Path, registration: Registration, ca_file: Path | None = None
    ) -> None:
        self.server = server.rstrip("/")
        self.state_dir = state_dir
        self.registration = registration
        self.ca_file = ca_file
        self.identity = Identity.in_dir(state_dir)
        self._saved = state_dir / "registration.json"
        self._http = self._client()
        self.component_id: str | None = None
        self._token: str | None = None
        # Where this component's data listener really is; heartbeats keep the server's record current.
        self.address: str | None = registration.address
        # The desired state last received and its version: the server answers "unchanged" (no
        # desired) while the version we send is still current, so an idle heartbeat stays small.
        self._desired: dict[str, object] | None = None
        self._desired_version: str | None = None
        self.desired_changed = False  # the last answer carried a desired state new to us
        # An overloaded server answers 429/503 with Retry-After: no heartbeat before this time.
        self._backoff_until = 0.0
        # Seconds between this component's heartbeats (`DesiredSource.pace`), told to the server
        # so that shedding one does not bring it back sooner than it would come anyway.
        self.interval: float | None = None
        # A master target's point lists go as deltas to what the server acknowledged.
        self._points = PointReports() if registration.kind == "master-target" else None

    def _client(self) -> httpx.Client:
        # One connection kept across idle intervals (httpx's default expiry, 5 s, is shorter than
        # an agent's 10 s): no new connection, and over HTTPS no handshake, per heartbeat.
        limits = httpx.Limits(max_connections=100, keepalive_expiry=COMPONENT_KEEP_ALIVE)
        return httpx.Client(timeout=15.0, verify=self._trust(), limits=limits)

    def _trust(self) -> ssl.SSLContext | bool:
        """What the API's HTTPS certificate must chain to: the CA given, else the pinned one."""
        ca = self.ca_file or (self.identity.ca if self.identity.ca.exists() else None)
        if ca is not None:
            return pki.client_context(None, None, ca)
        if self.server.startswith("https://"):
            log.warning(
                "registering with %s without verifying its certificate (trust on first use); "
                "pass --ca-file with the server's CA (GET /api/ca) to verify it",
                self.server,
            )
        return False

    def _register_post(self, body: dict[str, object]) -> httpx.Response:
        try:
            return self._http.post(f"{self.server}/api/components/register", json=body)
        except httpx.ConnectError as exc:
            if "CERTIFICATE_VERIFY_FAILED" not in str(exc):
                raise
            raise SiteRecoveryError(
                Problem(
                    code="server-certificate-untrusted",
                    message=f"The configuration server at {self.server} presented a certificate "
                    f"that does not chain to the trusted CA ({exc})",
                    remediation="Check the server address; pass --ca-file with the CA from the server's "
                    "`GET /api/ca` (or its backup), and make sure its --tls-name covers this address.",
                )
            ) from exc

    def register(self, passphrase: str) -> Identity:
        if self._saved.exists() and self.identity.exists():
            saved = json.loads(self._saved.read_text())
            self.component_id, self._token = str(saved["id"]), str(saved["token"])
            return self.identity
        reg = self.registration
        body: dict[str, object] = {
            "passphrase": passphrase,
            "kind": reg.kind,
            "name": reg.name,
            "site": reg.site,
            "os_type": reg.os_type,
            "address": reg.address,
            "machine": reg.machine,
        }
        resp = self._register_post(body)
        if resp.status_code == 403:
            raise SiteRecoveryError(
                Problem(
                    code="passphrase-invalid",
                    message=f"The configuration server at {self.server} refused {reg.kind} {reg.name!r}'s "
                    "passphrase",
                    remediation="Copy the passphrase from the configuration server and retry.",
                )
            )
        resp.raise_for_status()
        out = resp.json()
        self.identity.write(
            pki.IssuedCertificate(out["cert_pem"].encode(), out["key_pem"].encode(), out["ca_pem"].encode())
        )
        self.component_id, self._token = str(out["id"]), str(out["token"])
        tmp = self._saved.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump({"id": self.component_id, "token": self._token}, f)
        os.replace(tmp, self._saved)
        self._http.close()
        self._http = self._client()  # pinned from now on
        return self.identity

    def close(self) -> None:
        self._http.close()

    def renew_if_due(self) -> bool:
        """Renew the certificate once a third of its lifetime is left; True if it was renewed."""
        cert = x509.load_pem_x509_certificate(self.identity.cert.read_bytes())
        start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
        # A certificate from before they named their component is renewed at once: hops refuse it.
        named = bool(pki.component_uris(cert))
        if named and end - dt.datetime.now(dt.UTC) > (end - start) * RENEW_WHEN_LEFT:
            return False
        key = serialization.load_pem_private_key(self.identity.key.read_bytes(), password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ValueError(f"{self.identity.key} is not an EC private key")
        csr = x509.CertificateSigningRequestBuilder().subject_name(cert.subject).sign(key, hashes.SHA256())
        resp = self._http.post(
            f"{self.server}/api/components/{self.component_id}/certificate",
            json={
                "cert_pem": self.identity.cert.read_text(),
                "csr_pem": csr.public_bytes(serialization.Encoding.PEM).decode(),
            },
            headers={"Authorization": f"Bearer {self._token}"},
        )
        if resp.status_code != 200:
            log.warning("certificate renewal refused (%s): %s", resp.status_code, resp.text[:500])
            return False
        _write_atomically(self.identity.cert, str(resp.json()["cert_pem"]))
        self.identity.reload()
        log.info("certificate %s renewed", format(cert.serial_number, "x"))
        return True

    def heartbeat(self, stats: BaseModel) -> dict[str, object]:
        """Send stats, return the raw desired state (the one held when the server says unchanged).

        Raises `ServerBusy` while backing off from an overloaded server, `httpx.HTTPError` when
        the server cannot be reached or refuses.
        """
        clock = time.monotonic()
        if clock < self._backoff_until:
            raise ServerBusy(self._backoff_until - clock)
        report = stats.model_dump(mode="json")
        body: dict[str, object] = {"stats": self._points.encode(report) if self._points else report}
        if self.address:
            body["address"] = self.address  # a restart may have moved the listener (e.g. --listen :0)
        if self._desired is not None and self._desired_version:
            body["desired_version"] = self._desired_version
        headers = {"Authorization": f"Bearer {self._token}"}
        if self.interval is not None:
            headers["X-Heartbeat-Interval"] = f"{self.interval:g}"
        # An impostor's certificate fails like an unreachable server: the last desired state holds.
        resp = self._http.post(
            f"{self.server}/api/components/{self.component_id}/heartbeat", json=body, headers=headers
        )
        if resp.status_code in (429, 503):
            wait = after_busy(resp.headers.get("Retry-After"))
            self._backoff_until = time.monotonic() + wait
            raise ServerBusy(wait)
        resp.raise_for_status()
        reply = resp.json()
        if self._points is not None:
            self._points.acknowledge(reply)
        desired = reply.get("desired")
        held = self._desired
        if desired is None and held is not None and reply.get("desired_version") == self._desired_version:
            self.desired_changed = False
            return dict(held)
        self.desired_changed = held is None or dict(desired or {}) != held
        self._desired = dict(desired or {})
        self._desired_version = str(reply.get("desired_version") or "") or None
        return dict(self._desired)


class ServerBusy(httpx.HTTPError):
    """The configuration server asked us to come back later (429/503): the last desired state holds."""

    def __init__(self, retry_in: float) -> None:
        super().__init__(f"configuration server busy; retrying in {retry_in:.1f} s")
        self.retry_in = retry_in


class Reporter:
    """Publishes a component's stats: to `<state_dir>/stats.json`, and as heartbeats if registered."""

    def __init__(self, state_dir: Path, client: ControlClient | None = None) -> None:
        self.client = client
        self._stats_file = state_dir / "stats.json"
        self._unreachable = False

    def report(self, stats: BaseModel) -> dict[str, object] | None:
        """Publish `stats`; the raw desired state when a configuration server answered.

        An unreachable or failing configuration server is not this component's failure: replication
        goes on with what it was told last (CS-2 is checked by reprotect and failback, not enforced
        by stopping the data plane).
        """
        tmp = self._stats_file.with_suffix(".tmp")
        tmp.write_text(stats.model_dump_json(indent=2))
        os.replace(tmp, self._stats_file)
        if self.client is None:
            return None
        try:
            self.client.renew_if_due()
            return self.client.heartbeat(stats)
        except ServerBusy as exc:
            log.info("%s; keeping the last desired state", exc)
            return None
        except httpx.HTTPError as exc:
            if not self._unreachable:
                log.warning("configuration server unreachable (%s); keeping the last desired state", exc)
            self._unreachable = True
            return None


class DesiredSource(Reporter, Generic[D]):
    """One reconcile cycle: publish stats, get the desired state from the server or a file."""

    def __init__(
        self,
        model: type[D],
        state_dir: Path,
        client: ControlClient | None = None,
        assignments: Path | None = None,
    ) -> None:
        super().__init__(state_dir, client)
        self.model = model
        self.assignments = assignments
        self._desired_file = state_dir / "desired.json"
        # False when the last exchange found no desired state at all (server away, nothing saved).
        self.known = True

    def pace(self, idle: float, busy: bool = False) -> float:
        """Seconds until the next heartbeat: `idle`, or at most FAST_INTERVAL while things change.

        An idle component reports every `idle` seconds (its stats feed RPO and liveness, which
        need tens of seconds, not two). Right after the server changed its desired state, or
        while the component is `busy` (an agent's pair syncing), it heartbeats fast, so the next
        change of a workflow (a failover draining pairs, a bookmark) follows within seconds."""
        changed = self.client is not None and self.client.desired_changed
        interval = min(idle, FAST_INTERVAL) if busy or changed else idle
        if self.client is not None:
            self.client.interval = interval  # said in the next heartbeat (`control.admission`)
        return interval

    def exchange(self, stats: BaseModel) -> D:
        self.known = True
        raw = self.report(stats)
        if raw is not None:
            if self._unreachable:
                log.warning("configuration server reachable again")
                self._unreachable = False
            desired = self.model.model_validate(raw)
            _write_atomically(self._desired_file, desired.model_dump_json())
            return desired
        if self.assignments is not None and self.assignments.exists():
            return self.model.model_validate_json(self.assignments.read_text())
        if self.client is not None and self._desired_file.exists():
            # The server is away: keep doing what it asked last, even across a restart of ours.
            return self.model.model_validate_json(self._desired_file.read_text())
        self.known = self.client is None
        return self.model()


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def load_identity(state_dir: Path, client: ControlClient | None, passphrase_file: Path | None) -> Identity:
    """The component's certificate: registered with the server, or already in the state directory."""
    if client is not None:
        if passphrase_file is None:
            raise SiteRecoveryError(
                Problem(
                    code="passphrase-missing",
                    message="Registering with the configuration server needs its passphrase",
                    remediation="Pass --passphrase-file with the configuration server's passphrase.",
                )
            )
        return client.register(passphrase_file.read_text().strip())
    identity = Identity.in_dir(state_dir)
    if not identity.exists():
        raise SiteRecoveryError(
            Problem(
                code="component-not-registered",
                message=f"No certificate in {state_dir / 'tls'} and no configuration server to register with",
                remediation="Start with --server URL --passphrase-file F, or put component.crt, "
                "component.key and ca.crt in the state directory's tls/ folder.",
            )
        )
    return identity
