"""The wire protocol refuses corrupt and truncated frames; only certified peers get in."""

from __future__ import annotations

import json
import socket
import ssl
from pathlib import Path

import pytest
from tests.dataplane.conftest import Plane, make_image, wait_for

from siterecovery.dataplane.links import Identity, connect
from siterecovery.dataplane.protocol import (
    HEADER_SIZE,
    CorruptFrame,
    ErrorBody,
    Flag,
    FrameReader,
    FrameType,
    FrameWriter,
    Header,
    Hello,
    Role,
    TruncatedFrame,
    decode_model,
    encode_frame,
)
from siterecovery.pki import CertificateAuthority


def _pair() -> tuple[socket.socket, socket.socket]:
    return socket.socketpair()


@pytest.mark.parametrize(
    "where", [pytest.param(HEADER_SIZE + 100, id="payload-byte"), pytest.param(30, id="header-offset-byte")]
)
def test_flipped_byte_is_detected(where: int) -> None:
    frame = bytearray(encode_frame(FrameType.WRITE, 0, 7, 4096, 512, bytes(range(256)) * 2))
    frame[where] ^= 0x40
    a, b = _pair()
    with a, b:
        a.sendall(frame)
        with pytest.raises(CorruptFrame) as info:
            FrameReader(b).read()
        assert info.value.seq == 7 or where < HEADER_SIZE


def test_truncated_frame_is_refused() -> None:
    frame = encode_frame(FrameType.WRITE, 0, 1, 0, 4096, b"x" * 4096)
    a, b = _pair()
    with b:
        a.sendall(frame[:-10])
        a.close()
        with pytest.raises(TruncatedFrame):
            FrameReader(b).read()


def test_good_frames_round_trip_through_reused_buffers() -> None:
    a, b = _pair()
    with a, b:
        w, r = FrameWriter(a), FrameReader(b)
        w.send(FrameType.WRITE, 0, 1, 0, 8, b"abcdefgh")
        w.send(
            FrameType.WRITE,
            0,
            2,
            8,
            1 << 20,
            flags=Flag.ZERO,
        )
        first = r.read()
        assert first is not None and bytes(first.payload) == b"abcdefgh"
        second = r.read()
        assert second is not None and second.header.seq == 2 and second.header.length == 1 << 20


def test_a_frame_received_into_the_callers_buffer_is_verified_and_kept() -> None:
    """`place` (the process server's frames held in memory): the payload lands after a header's
    room in the caller's own buffer, verified; a damaged one is refused all the same."""
    payload = bytes(range(256)) * 256  # 64 KiB: fits a socket pair's buffer
    a, b = _pair()
    with a, b:
        w, r = FrameWriter(a), FrameReader(b)
        w.send(FrameType.BLOCK, 0, 1, 0, len(payload), payload)
        w.send(FrameType.HEARTBEAT)
        kept: list[bytearray] = []

        def place(h: Header) -> bytearray | None:
            if h.type is not FrameType.BLOCK:
                return None
            kept.append(bytearray(HEADER_SIZE + h.payload_len))
            return kept[-1]

        first = r.read(place)
        assert first is not None and first.buffer is kept[0]
        assert bytes(kept[0][HEADER_SIZE:]) == payload == bytes(first.wire)
        heartbeat = r.read(place)
        assert heartbeat is not None and heartbeat.buffer is None and len(kept) == 1
        damaged = bytearray(encode_frame(FrameType.BLOCK, 0, 2, 0, len(payload), payload))
        damaged[HEADER_SIZE + 5] ^= 0x01
        a.sendall(damaged)
        with pytest.raises(CorruptFrame):
            r.read(place)


def _foreign_context(tmp: Path, self_signed: bool, trusted_ca: Path) -> ssl.SSLContext:
    other = CertificateAuthority.load_or_create(tmp / "other-ca")
    issued = other.issue("intruder")
    ident = Identity.in_dir(tmp / "intruder")
    ident.write(issued)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(trusted_ca)
    if self_signed:
        (tmp / "self.crt").write_bytes(other.cert_pem)
        (tmp / "self.key").write_bytes((tmp / "other-ca" / "ca.key").read_bytes())
        ctx.load_cert_chain(tmp / "self.crt", tmp / "self.key")
    else:
        ctx.load_cert_chain(ident.cert, ident.key)
    return ctx


@pytest.mark.parametrize("hop", ["process-server", "master-target"])
@pytest.mark.parametrize(
    "self_signed", [pytest.param(True, id="self-signed"), pytest.param(False, id="other-ca")]
)
def test_client_without_valid_certificate_cannot_connect(plane: Plane, hop: str, self_signed: bool) -> None:
    comp = plane.process_server() if hop == "process-server" else plane.master_target([])
    comp.start()
    address = comp.wait_address()
    ctx = _foreign_context(plane.root, self_signed, plane.root / "ca" / "ca.crt")
    with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
        sock = connect(address, ctx)
        # TLS 1.3 reports a refused client certificate on the first read.
        FrameWriter(sock).send_model(
            FrameType.HELLO, Hello(component="x", role=Role.PROCESS_SERVER, pairs=["p"])
        )
        if FrameReader(sock).read() is None:
            raise ConnectionError("closed by the server")


def test_master_target_refuses_the_61st_disk(plane: Plane) -> None:
    disks = []
    for i in range(61):
        path = make_image(plane.root / f"t{i}.img", 1 << 20)
        disks.append({"pair_id": f"p{i:02d}", "path": str(path), "size": 1 << 20})
    # Every disk accepts the process server "ps-client" (the Plane's default for its disks).
    disks = [{**d, "process_server": "ps-client"} for d in disks]
    mt = plane.master_target(disks).start()
    address = mt.wait_address()
    wait_for(lambda: bool(mt.stats().get("refused")), 30, "the MT's stats")
    stats = mt.stats()
    assert stats["attached_disks"] == 60
    assert [r["code"] for r in stats["refused"]] == ["mt-disk-limit"]  # type: ignore[index,union-attr]
    refused_pair = stats["refused"][0]["pair_id"]  # type: ignore[index]
    ps_identity = plane.identity(plane.root / "ps-client", "ps-client", "process-server")
    sock = connect(address, ps_identity.client_context())
    with sock:
        FrameWriter(sock).send_model(
            FrameType.HELLO, Hello(component="ps", role=Role.PROCESS_SERVER, pairs=[refused_pair])
        )
        reply = FrameReader(sock).read()
        assert reply is not None and reply.header.type == FrameType.ERROR
        err = decode_model(ErrorBody, reply.payload)
        assert err.code == "mt-disk-limit", json.dumps(err.model_dump())
