"""Who may talk to whom on the data plane, and what a frame may ask of a disk (docs/security.md).

Every hop authorises its peer by the SAN URI of the certificate the configuration server's CA
issued (`urn:siterecovery:<kind>:<id>`), against the assignments in its desired state: a process
server takes a pair only from the agent it is assigned to, a master target only from the process
server assigned to it, and no certificate acts as another kind. A revoked serial (a removed
component) is refused by every hop. Everything that becomes a path (pair ids, disk labels) must
match one strict pattern, and every data frame is checked against the disk's size and the pair's
sequence window before it is cached, acknowledged or applied. Refusals are logged and kept for
the component's statistics, so the configuration server raises an event naming the peer.
"""

from __future__ import annotations

import logging
import re
import ssl
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from cryptography import x509

from siterecovery import pki
from siterecovery.dataplane.assignments import PeerRefusal
from siterecovery.dataplane.protocol import Flag, Frame, FrameType
from siterecovery.errors import Problem

log = logging.getLogger(__name__)

# One pattern for every identifier that becomes a path: no separators, no leading dot.
IDENTIFIER = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
# Sequence numbers may jump by at most this many per 4 KiB of disk plus a fixed slack: each sync
# reserves one per 4 KiB block (two may be outstanding), an agent restart skips up to 2^20.
_SEQ_PER_BLOCK = 4
_SEQ_SLACK = 1 << 24
_BLOCK = 4096
KEPT_REFUSALS = 20


class PeerKind(StrEnum):
    AGENT = "agent"
    PROCESS_SERVER = "process-server"
    MASTER_TARGET = "master-target"


@dataclass(frozen=True)
class Peer:
    """Who is on the other end of a mutual-TLS link, from its certificate."""

    kind: PeerKind | None  # None: the certificate names no component (refused everywhere)
    id: str
    serial: str
    address: str

    def __str__(self) -> str:
        if self.kind is None:
            return f"unnamed certificate {self.serial}"
        return f"{self.kind.value}:{self.id}"


def valid_identifier(value: str) -> bool:
    return IDENTIFIER.fullmatch(value) is not None


def child(base: Path, name: str) -> Path:
    """`base / name` for a checked identifier; ValueError for anything that could leave `base`."""
    if not valid_identifier(name):
        raise ValueError(f"{name!r} is not a valid identifier")
    return base / name


def peer_of(sock: ssl.SSLSocket, address: str) -> Peer:
    """The component named by the peer's certificate (the handshake already verified the chain)."""
    der = sock.getpeercert(binary_form=True)
    if der is None:
        return Peer(None, "", "", address)
    cert = x509.load_der_x509_certificate(der)
    serial = pki.serial_hex(cert.serial_number)
    for uri in pki.component_uris(cert):
        kind, _, component_id = uri[len(pki.URI_PREFIX) :].partition(":")
        if kind in PeerKind.__members__.values() and component_id:
            return Peer(PeerKind(kind), component_id, serial, address)
    return Peer(None, "", serial, address)


def max_seq_step(size: int) -> int:
    """How far one frame's sequence may run ahead of the pair's last one (see `_SEQ_PER_BLOCK`)."""
    return _SEQ_PER_BLOCK * (size // _BLOCK + 2) + _SEQ_SLACK


def frame_problem(pair_id: str, seq: int, last: int, offset: int, length: int, size: int) -> Problem | None:
    """Why a data frame must be refused, or None: its range must lie in the disk, its seq near the last."""
    if offset < 0 or length < 0 or offset + length > size:
        return Problem(
            code="frame-out-of-bounds",
            message=f"A frame for pair {pair_id!r} covers bytes {offset}..{offset + length} of a "
            f"{size}-byte disk.",
            remediation="None for the receiver: the sender is faulty or hostile; its session ends.",
        )
    if seq > max(last, 0) + max_seq_step(size):
        return Problem(
            code="sequence-out-of-window",
            message=f"Frame sequence {seq} of pair {pair_id!r} is too far ahead of {last}.",
            remediation="None for the receiver: the sender is faulty or hostile; its session ends.",
        )
    return None


def data_frame_problem(pair_id: str, frame: Frame, last: int, size: int) -> Problem | None:
    """`frame_problem` for a received data frame: a WRITE covers its payload, a zero its length."""
    h = frame.header
    extent = 0 if h.type == FrameType.BOOKMARK else h.length if h.flags & Flag.ZERO else len(frame.payload)
    return frame_problem(pair_id, h.seq, last, h.offset, extent, size)


NOT_AUTHORISED = "peer-not-authorised"


def not_authorised(peer: Peer, what: str) -> Problem:
    return Problem(
        code=NOT_AUTHORISED,
        message=f"{peer} ({peer.address}) may not {what}.",
        remediation="Check which component the pair is assigned to; a removed component must register anew.",
    )


class Refusals:
    """The refusals a hop made: logged at once, the newest kept for its statistics (and events)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._kept: list[PeerRefusal] = []
        self.total = 0

    def add(self, peer: Peer, problem: Problem, pair_id: str = "") -> Problem:
        log.warning("refused %s from %s: %s: %s", peer, peer.address, problem.code, problem.message)
        with self._lock:
            self.total += 1
            self._kept.append(
                PeerRefusal(
                    number=self.total,
                    time=time.time(),
                    peer=str(peer),
                    address=peer.address,
                    pair_id=pair_id if valid_identifier(pair_id) else "",
                    code=problem.code,
                    message=problem.message,
                )
            )
            del self._kept[:-KEPT_REFUSALS]
        return problem

    @property
    def kept(self) -> list[PeerRefusal]:
        with self._lock:
            return list(self._kept)


class Revocations:
    """The revoked certificate serials a hop refuses; replaced from each desired state."""

    def __init__(self) -> None:
        self._serials: frozenset[str] = frozenset()

    def update(self, serials: Iterable[str]) -> None:
        self._serials = frozenset(s.lower() for s in serials)

    def __contains__(self, serial: object) -> bool:
        return serial in self._serials

    @property
    def serials(self) -> frozenset[str]:
        return self._serials


def check_server(
    sock: ssl.SSLSocket, address: str, kind: PeerKind, expected_id: str, revoked: Revocations | None = None
) -> Peer:
    """A client's check of the server it reached: the right kind (and id when known), not revoked."""
    peer = peer_of(sock, address)
    if peer.kind is not kind or (expected_id and peer.id != expected_id):
        wanted = f"{kind.value}:{expected_id}" if expected_id else kind.value
        raise ssl.SSLError(f"{address} presented {peer}, not {wanted}")
    if revoked is not None and peer.serial in revoked:
        raise ssl.SSLError(f"{address} presented revoked certificate {peer.serial}")
    return peer
