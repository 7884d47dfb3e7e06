"""Hostile peers on the data plane (issue 13, D1-D5): real processes, real mutual TLS.

A component holding a certificate from the same CA must not reach outside the process server's
cache (D1), write into a pair not assigned to it (D2), make the process server acknowledge frames
its master target will drop (D3), act as another kind of component or replace a live session (D4),
or write beyond a disk's end (D5).
"""

from __future__ import annotations

import json
import os
import ssl
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from tests.conftest import require_tool
from tests.dataplane.conftest import (
    Component,
    Plane,
    applied_seq,
    make_image,
    relay,
    replication,
    wait_for,
    wait_replicated,
    write_json,
)

from siterecovery.dataplane.links import Identity, connect
from siterecovery.dataplane.protocol import (
    ErrorBody,
    Frame,
    FrameReader,
    FrameType,
    FrameWriter,
    Hello,
    HelloReply,
    ProtocolError,
    Role,
    decode_model,
)

MiB = 1 << 20
SIZE = 64 * MiB
PAIR = "web1.g1.d0"
HUGE_SEQ = (1 << 62) + 1


@dataclass
class Live:
    agent: Component
    ps: Component
    mt: Component
    ps_addr: str
    mt_addr: str
    src: Path
    target: Path


@pytest.fixture
def live(plane: Plane) -> Live:
    """web1's disk replicated by its agent through `ps` to `mt` (journaled), fully synced."""
    src = make_image(plane.root / "src.img", SIZE, [(0, MiB, 0x11)])
    target = plane.root / "target.img"
    mt = plane.master_target([{"pair_id": PAIR, "path": str(target), "size": SIZE, "process_server": "ps"}])
    mt_addr = mt.start().wait_address()
    ps = plane.process_server(relays=[relay(PAIR, "agent", mt_addr, "mt", SIZE)]).start()
    ps_addr = ps.wait_address()
    agent = plane.agent([replication(PAIR, "d0", ps_addr, mt_addr)], {"d0": src}).start()
    wait_replicated(agent, mt, PAIR)
    return Live(agent, ps, mt, ps_addr, mt_addr, src, target)


@contextmanager
def session(address: str, identity: Identity, hello: Hello) -> Iterator[tuple[Frame | None, FrameWriter]]:
    """A hand-made session: the first frame the receiver answers HELLO with (None: it hung up)."""
    sock = connect(address, identity.client_context())
    try:
        writer, reader = FrameWriter(sock), FrameReader(sock)
        writer.send_model(FrameType.HELLO, hello)
        try:
            first = reader.read()
        except (OSError, ProtocolError):
            first = None
        yield first, writer
    finally:
        sock.close()


def refused(first: Frame | None) -> bool:
    return first is None or first.header.type == FrameType.ERROR


def acked_or_refused(address: str, identity: Identity, hello: Hello, frames: list[dict[str, object]]) -> str:
    """Send data frames after HELLO; "acked" if the receiver acknowledged one, else "refused"."""
    sock = connect(address, identity.client_context())
    try:
        writer, reader = FrameWriter(sock), FrameReader(sock)
        writer.send_model(FrameType.HELLO, hello)
        first = reader.read()
        if refused(first):
            return "refused"
        for f in frames:
            writer.send(FrameType.WRITE, **f)  # type: ignore[arg-type]
        sock.settimeout(30)
        while True:
            frame = reader.read()
            if frame is None or frame.header.type in (FrameType.ERROR, FrameType.NACK):
                return "refused"
            if frame.header.type == FrameType.ACK:
                return "acked"
    except (OSError, ssl.SSLError, ProtocolError):
        return "refused"
    finally:
        sock.close()


def qemu_write(plane: Plane, pattern: int, offset: str) -> None:
    sock = plane.root / "nbd" / "d0.sock"
    subprocess.run(
        [
            require_tool("qemu-io"),
            "-f",
            "raw",
            "-c",
            f"write -P {pattern} {offset} 64k",
            "-c",
            "flush",
            f"nbd+unix:///d0?socket={sock}",
        ],
        check=True,
        capture_output=True,
    )


def identical(a: Path, b: Path) -> bool:
    cmd = [require_tool("qemu-img"), "compare", "-q", "-f", "raw", "-F", "raw", str(a), str(b)]
    return subprocess.run(cmd, capture_output=True).returncode == 0


def test_d1_pair_ids_never_leave_the_cache(plane: Plane, live: Live) -> None:
    """D1: HELLO naming `../../x` or an absolute path creates nothing outside the cache."""
    evil = plane.identity(plane.root / "evil", "evil", "agent")
    outside = plane.root / "outside"
    for pair in ("../../x", "../../../outside", str(outside), "a/../../b"):
        hello = Hello(component="evil", role=Role.AGENT, pairs=[pair], master_target=live.mt_addr)
        with session(live.ps_addr, evil, hello) as (first, _):
            assert refused(first), pair
    # The cache lives in <root>/ps/cache: nothing named by those ids exists around it.
    assert not (plane.root / "x").exists() and not (plane.root / "ps" / "x").exists()
    assert not outside.exists() and not (plane.root / "b").exists()
    # Even the pair's real agent cannot name a path.
    real = Identity.in_dir(plane.root / "agent")
    hello = Hello(component="agent", role=Role.AGENT, pairs=["../x"], master_target=live.mt_addr)
    with session(live.ps_addr, real, hello) as (first, _):
        assert refused(first)
    assert not (plane.root / "ps" / "x").exists()
    assert sorted(p.name for p in (plane.root / "ps" / "cache").iterdir()) == [PAIR]


def test_d2_another_component_cannot_write_into_a_pair(plane: Plane, live: Live) -> None:
    """D2: a valid agent certificate not assigned to web1 cannot write into web1's pair."""
    evil = plane.identity(plane.root / "evil", "evil", "agent")
    hello = Hello(component="evil", role=Role.AGENT, pairs=[PAIR], master_target=live.mt_addr)
    payload = b"\xee" * 4096
    frames = [{"pair": 0, "seq": HUGE_SEQ, "offset": 0, "length": len(payload), "payload": payload}]
    assert acked_or_refused(live.ps_addr, evil, hello, frames) == "refused"
    # The refusal names the peer in the process server's statistics (and so in an event).
    wait_for(lambda: any(r["peer"] == "agent:evil" for r in live.ps.stats().get("refused_peers", [])), 30,
             "the refusal to be reported")  # fmt: skip
    assert applied_seq(live.mt, PAIR) < HUGE_SEQ
    with open(live.target, "rb") as f:
        assert f.read(4096) == b"\x11" * 4096


def test_d3_a_frame_the_master_target_would_drop_is_never_acknowledged(plane: Plane, live: Live) -> None:
    """D3: even from the pair's own agent, seq 2^62+1 is refused; its real frames then still apply."""
    real = Identity.in_dir(plane.root / "agent")
    hello = Hello(component="agent", role=Role.AGENT, pairs=[PAIR], master_target=live.mt_addr)
    payload = b"\xee" * 4096
    frames = [{"pair": 0, "seq": HUGE_SEQ, "offset": 0, "length": len(payload), "payload": payload}]
    assert acked_or_refused(live.ps_addr, real, hello, frames) == "refused"
    qemu_write(plane, 0x5A, "8M")
    wait_replicated(live.agent, live.mt, PAIR)
    assert applied_seq(live.mt, PAIR) < HUGE_SEQ
    wait_for(lambda: identical(live.src, live.target), 60, "the replica to equal the source")


def test_d4_an_agent_certificate_cannot_act_as_a_process_server(plane: Plane, live: Live) -> None:
    """D4: the master target refuses an agent's certificate (and a process server not assigned)."""
    agent_cert = Identity.in_dir(plane.root / "agent")
    hello = Hello(component="ps", role=Role.PROCESS_SERVER, pairs=[PAIR])
    with session(live.mt_addr, agent_cert, hello) as (first, _):
        assert refused(first)
    other_ps = plane.identity(plane.root / "ps2", "ps2", "process-server")
    with session(live.mt_addr, other_ps, hello) as (first, _):
        assert refused(first)
        if first is not None:
            assert decode_model(ErrorBody, first.payload).code == "peer-not-authorised"
    # The real process server's session was never replaced: replication goes on.
    qemu_write(plane, 0x6B, "16M")
    wait_replicated(live.agent, live.mt, PAIR)
    wait_for(lambda: identical(live.src, live.target), 60, "the replica to equal the source")


def test_d5_writes_beyond_the_disk_are_refused(plane: Plane, live: Live) -> None:
    """D5: a WRITE at 2^40 on a 64 MiB replica is refused by both hops; the replica keeps its size."""
    payload = b"\xee" * 4096
    far = [{"pair": 0, "seq": 1 << 30, "offset": 1 << 40, "length": len(payload), "payload": payload}]
    real_agent = Identity.in_dir(plane.root / "agent")
    hello = Hello(component="agent", role=Role.AGENT, pairs=[PAIR], master_target=live.mt_addr)
    assert acked_or_refused(live.ps_addr, real_agent, hello, far) == "refused"
    real_ps = Identity.in_dir(plane.root / "ps")
    ps_hello = Hello(component="ps", role=Role.PROCESS_SERVER, pairs=[PAIR])
    assert acked_or_refused(live.mt_addr, real_ps, ps_hello, far) == "refused"
    assert os.stat(live.target).st_size == SIZE
    # The first reply of a session the process server accepts is its durable sequence.
    with session(live.ps_addr, real_agent, hello) as (first, _):
        assert first is not None and first.header.type == FrameType.HELLO
        assert decode_model(HelloReply, first.payload).acked[PAIR] < (1 << 30)


def _serial(state_dir: Path) -> str:
    cert = x509.load_pem_x509_certificate(Identity.in_dir(state_dir).cert.read_bytes())
    return format(cert.serial_number, "x")


def _refused_for(comp: Component, peer: str, why: str) -> bool:
    return any(r["peer"] == peer and why in r["message"] for r in comp.stats().get("refused_peers", []))  # type: ignore[union-attr,index,operator]


def test_a_removed_component_is_refused_by_every_hop(plane: Plane, live: Live) -> None:
    """Revoked serials (what `servers remove` puts in every desired state) end live sessions and
    are refused at the next HELLO: the agent by its process server, the process server by its
    master target."""
    agent_serial, ps_serial = _serial(plane.root / "agent"), _serial(plane.root / "ps")
    plane.assign_relays("ps", [relay(PAIR, "agent", live.mt_addr, "mt", SIZE)], revoked=[agent_serial])
    wait_for(lambda: _refused_for(live.ps, "agent:agent", "revoked"), 30, "the agent to be refused")
    hello = Hello(component="agent", role=Role.AGENT, pairs=[PAIR], master_target=live.mt_addr)
    with session(live.ps_addr, Identity.in_dir(plane.root / "agent"), hello) as (first, _):
        assert refused(first)

    mt_file = plane.root / "mt-assignments.json"
    write_json(mt_file, {**json.loads(mt_file.read_text()), "revoked": [ps_serial]})
    wait_for(lambda: _refused_for(live.mt, "process-server:ps", "revoked"), 30, "the PS to be refused")
    ps_hello = Hello(component="ps", role=Role.PROCESS_SERVER, pairs=[PAIR])
    with session(live.mt_addr, Identity.in_dir(plane.root / "ps"), ps_hello) as (first, _):
        assert refused(first)
