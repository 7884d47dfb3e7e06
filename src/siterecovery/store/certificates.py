"""Component certificates' life cycle: issue at registration, renew before expiry, revoke at removal.

Every certificate the CA gives a component names it (`urn:siterecovery:<kind>:<id>`) and lives
`component_cert_days` (7 by default). Its serial is recorded, so removing a component revokes all
of its certificates; the revoked serials still valid reach every hop through its desired state
(`revoked_serials`), and the API refuses them. A component renews over the API with a CSR for the
key it already holds, sent with its current certificate: the request proves possession of that
key (the CSR's signature) and the certificate proves the CA named this component with it.
"""

from __future__ import annotations

import datetime as dt

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from sqlalchemy import select
from sqlalchemy.orm import Session

from siterecovery import pki
from siterecovery.errors import Problem, SiteRecoveryError, Status
from siterecovery.store.context import ControlPlane
from siterecovery.store.models import Component, ComponentCertificate, Token, now


def _validity(cp: ControlPlane) -> dt.timedelta:
    return dt.timedelta(days=cp.config.component_cert_days)


def _record(s: Session, row: Component, cert: x509.Certificate) -> None:
    s.add(
        ComponentCertificate(
            serial=pki.serial_hex(cert.serial_number),
            component_id=row.id,
            kind=row.kind,
            not_after=cert.not_valid_after_utc.timestamp(),
        )
    )


def _hosts(row: Component) -> tuple[str, ...]:
    return tuple(sorted({"127.0.0.1", "localhost", row.address.rsplit(":", 1)[0] or "127.0.0.1"}))


def issue(cp: ControlPlane, s: Session, row: Component) -> pki.IssuedCertificate:
    """A new key and certificate naming the component (registration)."""
    issued = cp.ca.issue(
        f"{row.kind}:{row.name}", _hosts(row), kind=row.kind, component_id=row.id, validity=_validity(cp)
    )
    _record(s, row, x509.load_pem_x509_certificate(issued.cert_pem))
    return issued


def _refused(message: str, status: Status = Status.FORBIDDEN) -> SiteRecoveryError:
    return SiteRecoveryError(
        Problem(
            code="certificate-refused",
            message=message,
            remediation="Register the component again with the passphrase (its certificate expired, "
            "was revoked, or belongs to another component).",
        ),
        status,
    )


def _names(cert: x509.Certificate, row: Component) -> bool:
    """The certificate was issued to this component: its SAN URI, or (issued before certificates
    carried one) its common name, so components registered earlier move to named certificates."""
    uris = pki.component_uris(cert)
    if uris:
        return pki.component_uri(row.kind, row.id) in uris
    names = cert.subject.get_attributes_for_oid(x509.oid.NameOID.COMMON_NAME)
    return [n.value for n in names] == [f"{row.kind}:{row.name}"]


def renew(cp: ControlPlane, s: Session, row: Component, cert_pem: str, csr_pem: str) -> bytes:
    """A renewed certificate for the key the component holds; refused unless its current one is good."""
    try:
        current = x509.load_pem_x509_certificate(cert_pem.encode())
        csr = x509.load_pem_x509_csr(csr_pem.encode())
    except ValueError as exc:
        raise _refused(f"The certificate or CSR sent by {row.name!r} cannot be read: {exc}.") from exc
    serial = pki.serial_hex(current.serial_number)
    if not cp.ca.verify_issued(current):
        raise _refused(f"Certificate {serial} was not issued by this configuration server's CA.")
    if current.not_valid_after_utc.timestamp() <= now():
        raise _refused(f"Certificate {serial} of {row.name!r} has expired.")
    if not _names(current, row):
        raise _refused(f"Certificate {serial} was not issued to {row.kind} {row.name!r}.")
    known = s.get(ComponentCertificate, serial)
    if known is not None and known.revoked_at is not None:
        raise _refused(f"Certificate {serial} of {row.name!r} is revoked.")
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    same_key = csr.public_key().public_bytes(*spki) == current.public_key().public_bytes(*spki)
    if not csr.is_signature_valid or not same_key:
        raise _refused(f"The CSR sent by {row.name!r} is not signed by the key of certificate {serial}.")
    renewed = cp.ca.sign_csr(csr, f"{row.kind}:{row.name}", _hosts(row), row.kind, row.id, _validity(cp))
    _record(s, row, renewed)
    return renewed.public_bytes(serialization.Encoding.PEM)


def revoke_component(s: Session, row: Component) -> list[str]:
    """Revoke every certificate and token of a component being removed; the serials revoked."""
    at = now()
    serials = []
    for cert in s.scalars(select(ComponentCertificate).where(ComponentCertificate.component_id == row.id)):
        if cert.revoked_at is None:
            cert.revoked_at = at
            serials.append(cert.serial)
    for token in s.scalars(select(Token).where(Token.component_id == row.id)):
        token.revoked = True
    return serials


def revoked_serials(s: Session) -> list[str]:
    """Revoked serials not yet expired: what every hop must refuse (expired ones fail TLS anyway)."""
    rows = s.scalars(
        select(ComponentCertificate.serial).where(
            ComponentCertificate.revoked_at.is_not(None), ComponentCertificate.not_after > now()
        )
    )
    return sorted(rows)
