"""The configuration server's certificate authority and the TLS contexts built on it.

Built on the `cryptography` package, never hand-rolled. The CA signs one certificate per
registered component (agent, process server, master target); data-plane links then use mutual
TLS, so nobody joins the replication mesh without first registering with the passphrase. A
component's certificate names its kind and id in a SAN URI (`urn:siterecovery:<kind>:<id>`): the
hops authorise a peer by that name, never by the CN. Component certificates are short-lived and
renewed from a CSR signed by the key they already hold (`sign_csr`).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import ssl
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

_VALIDITY = dt.timedelta(days=825)  # the configuration server's own HTTPS certificate
COMPONENT_VALIDITY = dt.timedelta(days=7)
URI_PREFIX = "urn:siterecovery:"


def component_uri(kind: str, component_id: str) -> str:
    return f"{URI_PREFIX}{kind}:{component_id}"


def component_uris(cert: x509.Certificate) -> list[str]:
    """The `urn:siterecovery:` URIs a certificate's SAN carries (none before they named components)."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [u for u in san.get_values_for_type(x509.UniformResourceIdentifier) if u.startswith(URI_PREFIX)]


def serial_hex(serial: int) -> str:
    """How serials are written in revocation lists and the database."""
    return format(serial, "x")


@dataclass(frozen=True)
class IssuedCertificate:
    cert_pem: bytes
    key_pem: bytes
    ca_pem: bytes

    def write(self, directory: Path, stem: str) -> tuple[Path, Path, Path]:
        """Write cert, key (mode 0600) and CA bundle; return their paths."""
        directory.mkdir(parents=True, exist_ok=True)
        cert, key, ca = directory / f"{stem}.crt", directory / f"{stem}.key", directory / "ca.crt"
        cert.write_bytes(self.cert_pem)
        fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(self.key_pem)
        ca.write_bytes(self.ca_pem)
        return cert, key, ca


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


class CertificateAuthority:
    """A small CA kept in a directory (`ca.crt`, `ca.key`)."""

    def __init__(self, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> None:
        self.cert = cert
        self.key = key

    @property
    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    @classmethod
    def load_or_create(cls, directory: Path, common_name: str = "siterecovery CA") -> CertificateAuthority:
        cert_path, key_path = directory / "ca.crt", directory / "ca.key"
        if cert_path.exists() and key_path.exists():
            key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
            if not isinstance(key, ec.EllipticCurvePrivateKey):
                raise ValueError(f"{key_path} is not an EC private key")
            return cls(x509.load_pem_x509_certificate(cert_path.read_bytes()), key)
        directory.mkdir(parents=True, exist_ok=True)
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
        now = dt.datetime.now(dt.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .sign(key, hashes.SHA256())
        )
        ca = cls(cert, key)
        fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(_key_pem(key))
        cert_path.write_bytes(ca.cert_pem)
        return ca

    def issue(
        self,
        common_name: str,
        hosts: tuple[str, ...] = ("127.0.0.1", "localhost"),
        *,
        kind: str = "",
        component_id: str = "",
        validity: dt.timedelta = _VALIDITY,
        not_before: dt.datetime | None = None,
    ) -> IssuedCertificate:
        """Sign a certificate usable both as TLS server and client (components are both).

        With `kind` and `component_id` it carries the component's SAN URI (what hops authorise).
        """
        key = ec.generate_private_key(ec.SECP256R1())
        cert = self._sign(key.public_key(), common_name, hosts, kind, component_id, validity, not_before)
        return IssuedCertificate(cert.public_bytes(serialization.Encoding.PEM), _key_pem(key), self.cert_pem)

    def sign_csr(
        self,
        csr: x509.CertificateSigningRequest,
        common_name: str,
        hosts: tuple[str, ...],
        kind: str,
        component_id: str,
        validity: dt.timedelta,
        not_before: dt.datetime | None = None,
    ) -> x509.Certificate:
        """A renewed certificate for the CSR's key (the caller checked who holds that key)."""
        key = csr.public_key()
        if not isinstance(key, ec.EllipticCurvePublicKey):
            raise ValueError("the CSR's key is not an EC key")
        return self._sign(key, common_name, hosts, kind, component_id, validity, not_before)

    def _sign(
        self,
        public_key: ec.EllipticCurvePublicKey,
        common_name: str,
        hosts: tuple[str, ...],
        kind: str,
        component_id: str,
        validity: dt.timedelta,
        not_before: dt.datetime | None,
    ) -> x509.Certificate:
        alt: list[x509.GeneralName] = []
        for h in hosts:
            try:
                alt.append(x509.IPAddress(ipaddress.ip_address(h)))
            except ValueError:
                alt.append(x509.DNSName(h))
        if kind and component_id:
            alt.append(x509.UniformResourceIdentifier(component_uri(kind, component_id)))
        start = not_before or dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)
        return (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(self.cert.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(start + validity)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName(alt), critical=False)
            .add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                critical=False,
            )
            .sign(self.key, hashes.SHA256())
        )

    def verify_issued(self, cert: x509.Certificate) -> bool:
        """True if this CA signed `cert` (its issuer and signature)."""
        try:
            cert.verify_directly_issued_by(self.cert)
        except (ValueError, TypeError, InvalidSignature):
            return False
        return True


def server_context(cert: Path, key: Path, ca: Path, require_client_cert: bool = True) -> ssl.SSLContext:
    """TLS server side; by default mutual TLS (a client without a CA-signed cert is refused)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert, key)
    ctx.load_verify_locations(ca)
    ctx.verify_mode = ssl.CERT_REQUIRED if require_client_cert else ssl.CERT_NONE
    return ctx


def client_context(cert: Path | None, key: Path | None, ca: Path) -> ssl.SSLContext:
    """TLS client side: verifies the server against our CA and presents our certificate."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_verify_locations(ca)
    ctx.check_hostname = True
    if cert is not None and key is not None:
        ctx.load_cert_chain(cert, key)
    return ctx
