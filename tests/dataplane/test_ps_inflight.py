"""The process server's frames held in memory (`ps_inflight.py`): order, budgets, release, spill."""

from __future__ import annotations

import socket
import threading
from pathlib import Path

from siterecovery.dataplane.links import Identity
from siterecovery.dataplane.process_server import ProcessServer, _Session
from siterecovery.dataplane.protocol import (
    HEADER_SIZE,
    Flag,
    Frame,
    FrameReader,
    FrameType,
    FrameWriter,
    Header,
    encode_frame,
    parse_header,
)
from siterecovery.dataplane.ps_forward import Stream
from siterecovery.dataplane.ps_inflight import OWN_BUFFER, Budget, Held, Pool
from siterecovery.dataplane.trust import Peer, PeerKind
from siterecovery.pki import CertificateAuthority


def _frame(seq: int, size: int = 4096) -> tuple[Header, bytearray]:
    h = Header(FrameType.WRITE, Flag.NONE, 0, seq, seq * size, size, size, bytes(16))
    return h, bytearray(HEADER_SIZE + size)


def test_frames_are_handed_on_in_order_and_released_by_the_acknowledgement() -> None:
    budget = Budget(1 << 20)
    held = Held(budget, limit=1 << 20)
    for seq in (3, 4, 5):
        assert held.hold(*_frame(seq), wait=0)
    assert held.last_seq == 5 and len(held) == 3
    assert [h.seq for h, _ in held.after(3)] == [4, 5]
    assert held.after(5) == []
    assert held.find(4) is not None and held.find(6) is None
    assert not held.release(2)  # nothing held at or below 2
    assert held.release(4)
    assert [h.seq for h, _ in held.after(-1)] == [5]
    assert budget.used == held.bytes == HEADER_SIZE + 4096
    assert held.release(5)
    assert held.last_seq == -1 and budget.used == 0


def test_held_frames_are_stalled_only_while_the_master_target_acknowledges_none_of_them() -> None:
    """A paused or frozen pair's frames must not wait in memory for ever (`spill_stalled`)."""
    held = Held(Budget(1 << 20), limit=1 << 20)
    assert not held.stalled(0)  # nothing held
    assert held.hold(*_frame(1), wait=0) and held.hold(*_frame(2), wait=0)
    assert held.stalled(0) and not held.stalled(3600)
    ages = []
    held._progress_at -= 10  # the first frame was held 10 s ago, nothing acknowledged since
    ages.append(held.stalled(5))
    assert held.release(1)  # an acknowledgement is progress
    ages.append(held.stalled(5))
    assert ages == [True, False]
    assert held.release(2) and not held.stalled(0)


def test_no_room_past_the_pair_or_the_server_budget_but_one_frame_always_fits_an_empty_pair() -> None:
    size = HEADER_SIZE + 4096
    budget = Budget(3 * size)
    a, b = Held(budget, limit=2 * size), Held(budget, limit=2 * size)
    assert a.hold(*_frame(1), wait=0) and a.hold(*_frame(2), wait=0)
    assert not a.hold(*_frame(3), wait=0)  # the pair's limit
    assert b.hold(*_frame(1), wait=0)
    assert not b.hold(*_frame(2), wait=0)  # the server's budget, shared with `a`
    big = Held(Budget(1 << 30), limit=size)
    assert big.hold(*_frame(1, 1 << 20), wait=0)  # larger than the pair's limit, but alone


def test_a_release_makes_room_for_a_waiting_hold() -> None:
    size = HEADER_SIZE + 4096
    held = Held(Budget(), limit=size)
    assert held.hold(*_frame(1), wait=0)
    result: list[bool] = []
    waiter = threading.Thread(target=lambda: result.append(held.hold(*_frame(2), wait=60)))
    waiter.start()
    held.release(1)
    waiter.join(timeout=60)
    assert result == [True] and [h.seq for h, _ in held.after(-1)] == [2]


def test_spill_empties_in_order_and_gives_the_budget_back() -> None:
    budget = Budget()
    held = Held(budget)
    for seq in (7, 8, 9):
        held.hold(*_frame(seq), wait=0)
    assert [h.seq for h, _ in held.spill()] == [7, 8, 9]
    assert len(held) == 0 and held.last_seq == -1 and held.bytes == 0 and budget.used == 0


def _large(seq: int) -> Header:
    return Header(FrameType.BLOCK, Flag.NONE, 0, seq, seq * OWN_BUFFER, OWN_BUFFER, OWN_BUFFER, bytes(16))


def test_a_frame_buffer_is_reused_only_once_acknowledged_and_sent_never_once_spilled() -> None:
    """A buffer goes back to the pool only when the master target acknowledged its frame and the
    forwarder's send of it returned: reused earlier, the next frame received would overwrite bytes
    still to be sent."""
    n = HEADER_SIZE + OWN_BUFFER
    pool = Pool(limit=2 * n)
    held = Held(Budget(), pool=pool)
    small = Header(FrameType.WRITE, Flag.NONE, 0, 9, 0, 4096, 4096, bytes(16))
    assert pool.place(small) is None  # small frames go through the reader's own buffer
    bufs = [pool.place(_large(seq)) for seq in (1, 2, 3, 4)]
    assert all(b is not None and len(b) == n for b in bufs)
    for seq, buf in zip((1, 2, 3, 4), bufs, strict=True):
        assert buf is not None and held.hold(_large(seq), buf, wait=0)
    assert held.release(2, sent=1)  # 2 acknowledged but its send not yet returned: not reused
    assert pool.bytes == n
    assert pool.place(_large(5)) is bufs[0]
    fresh = pool.place(_large(6))
    assert all(fresh is not b for b in bufs)
    assert held.release(3, sent=3) and pool.bytes == n  # frame 3's buffer; frame 2's was let go
    assert pool.place(_large(7)) is bufs[2]
    assert [h.seq for h, _ in held.spill()] == [4]
    assert pool.bytes == 0  # a spilled frame's buffer is the cache's to write, never reused
    for seq in (10, 11, 12):
        held.hold(_large(seq), bytearray(n), wait=0)
    held.release(12, sent=12)
    assert pool.bytes == 2 * n  # never more than its limit
    kept = pool.place(_large(13))
    pool.clear()  # nothing held: an idle server keeps no pool
    assert pool.bytes == 0 and pool.place(_large(14)) is not kept


def _received(seq: int) -> Frame:
    raw = encode_frame(FrameType.WRITE, 0, seq, seq * 4096, 4096, bytes([seq % 251 + 1]) * 4096)
    view = memoryview(raw)
    return Frame(parse_header(view[:HEADER_SIZE]), view[HEADER_SIZE:], view[HEADER_SIZE:])


def _started_server(tmp_path: Path) -> ProcessServer:
    """A process server with its own identity from a fresh CA, started (stop it when done)."""
    ca = CertificateAuthority.load_or_create(tmp_path / "ca")
    identity = Identity.in_dir(tmp_path / "ps")
    identity.write(ca.issue("process-server:ps", kind="process-server", component_id="ps"))
    server = ProcessServer(tmp_path / "cache", identity)
    server.start()
    return server


def test_a_relay_holds_while_its_link_is_up_and_spills_in_order_before_caching(tmp_path: Path) -> None:
    """Held frames are never counted durable; once the link is down they go into the cache ahead of
    the next frame, in order, and a sync then covers them all (PS-1)."""
    server = _started_server(tmp_path)
    relay = server._relay("p1", "")  # no master target named: its forwarder stays idle
    a, b = socket.socketpair()
    try:
        hbuf = bytearray(HEADER_SIZE)
        assert relay.take(_received(1).header, _received(1), hbuf)  # link down: cached (the Acker's)
        # The link comes up (the forwarder's stream, not run here, took the cache up to seq 1).
        stream = Stream(relay.cache, relay.held, relay.refusals, FrameWriter(a), threading.Lock(), 1)
        relay._stream = stream
        for seq in (2, 3, 4):
            frame = _received(seq)
            assert not relay.take(frame.header, frame, hbuf)  # held: the Acker is not asked for it
        assert relay.cache.last_seq == 1 and relay.held.last_seq == 4 and relay.seen_seq == 4
        assert relay.synced_seq() == 1  # the held frames are not durable: never acknowledged
        relay._stream = None  # the link drops
        assert relay.take(_received(5).header, _received(5), hbuf)  # cached after the spilled ones
        assert len(relay.held) == 0 and relay.synced_seq() == 5
        cursor = relay.cache.cursor(-1)
        buf = bytearray(HEADER_SIZE + 8192)
        seqs = []
        while (item := cursor.next(buf)) is not None:
            seqs.append(item[0].seq)
            assert bytes(item[1][HEADER_SIZE:]) == bytes([item[0].seq % 251 + 1]) * 4096
        cursor.close()
        assert seqs == [1, 2, 3, 4, 5]
    finally:
        a.close()
        b.close()
        server.stop()


def test_held_frames_go_to_the_cache_when_the_link_drops_and_are_acknowledged_once_synced(
    tmp_path: Path,
) -> None:
    """An idle agent sends no next frame to spill them with: the link's end spills them itself."""
    server = _started_server(tmp_path)
    relay = server._relay("p1", "")  # no master target named: its forwarder stays idle
    a, b = socket.socketpair()
    agent_end, ps_end = socket.socketpair()
    try:
        relay.sessions.append(_Session(ps_end, ["p1"], Peer(PeerKind.AGENT, "agent", "1", "test")))  # type: ignore[arg-type]
        relay._stream = Stream(relay.cache, relay.held, relay.refusals, FrameWriter(a), threading.Lock(), -1)
        hbuf = bytearray(HEADER_SIZE)
        for seq in (1, 2, 3):
            frame = _received(seq)
            relay.take(frame.header, frame, hbuf)
        assert relay.held.last_seq == 3 and relay.cache.last_seq == -1
        relay._stream = None  # the link drops; the agent sends nothing more
        relay.link_dropped()
        assert len(relay.held) == 0 and relay.server.budget.used == 0
        assert relay.cache.last_seq == 3 and relay.synced_seq() == 3
        ack = FrameReader(agent_end).read()
        assert ack is not None and ack.header.type == FrameType.ACK and ack.header.seq == 3
    finally:
        for s in (a, b, agent_end, ps_end):
            s.close()
        server.stop()
