"""The process server: receives agents' frames, caches them durably, forwards them to master targets.

Each pair has a disk cache (a `SegmentLog` under `<cache_dir>/<pair_id>/`). A frame from an agent is
verified (header CRC, payload digest) and either held in memory while the link to the master
target is up and the cache holds nothing still to forward (`ps_inflight.py`: acknowledged to the
agent on the master target's ACK), or appended to the cache and acknowledged to the agent after
the cache is fsynced (on a thread of its own, `ps_acks.py`). Either way PS-1 holds: nothing
acknowledged is lost if the process server crashes. A forwarder thread per pair streams the cache,
then the frames held, to the master target named in the agent's HELLO (`ps_forward.py`) and frees
cache segments only on the master target's ACK. Resync requests and digests are relayed between
the two sessions without caching (they are queries, not data).

A cache found damaged on open (a bad frame header followed by intact frames, `segment_log.py`) lost
frames of unknown ranges: the forwarder sends a header-only MISSING|RESYNC frame in their place (the
master target marks points unusable), the agent is asked (REFETCH|RESYNC) to compare its whole disk
with the replica, and the loss is reported as a refused frame (an alert) until that resync applied.

Only the agent a pair is assigned to (its desired state's `pairs`) may open a session for it, and
only to the master target assigned to it; a data frame outside the disk or too far ahead of the
pair's sequence is refused before it is cached or acknowledged (`trust.py`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import ssl
import threading
import time
from pathlib import Path

from siterecovery.dataplane.assignments import (
    CacheHealth,
    ProcessServerDesired,
    ProcessServerStats,
    RefusedHop,
    RelayAssignment,
)
from siterecovery.dataplane.healing import RefusalLog
from siterecovery.dataplane.links import Identity, Listener, connect, idle
from siterecovery.dataplane.protocol import (
    HEADER_SIZE,
    MAX_PAYLOAD,
    CorruptFrame,
    ErrorBody,
    Flag,
    Frame,
    FrameReader,
    FrameType,
    FrameWriter,
    Header,
    Hello,
    HelloReply,
    ProtocolError,
    Role,
    decode_model,
    pack_header,
    read_hello,
)
from siterecovery.dataplane.ps_acks import Acker
from siterecovery.dataplane.ps_forward import Stream
from siterecovery.dataplane.ps_inflight import HOLD_BEHIND, Budget, Held, Pool
from siterecovery.dataplane.segment_log import SegmentLog
from siterecovery.dataplane.trust import (
    Peer,
    PeerKind,
    Refusals,
    Revocations,
    check_server,
    data_frame_problem,
    not_authorised,
    peer_of,
    valid_identifier,
)
from siterecovery.errors import Problem
from siterecovery.logs import PAIR_ID
from siterecovery.retry import Backoff

log = logging.getLogger(__name__)

# Acknowledge at least this often while frames keep arriving, so the sender's window keeps moving.
ACK_EVERY_BYTES = 32 << 20
WARNING_FREE_PERCENT = 30.0
CRITICAL_FREE_PERCENT = 25.0
_DATA_TYPES = (FrameType.WRITE, FrameType.BLOCK, FrameType.BOOKMARK)


class _Session:
    """One agent connection; its writer is shared by the session thread and digest relays."""

    def __init__(self, sock: ssl.SSLSocket, pairs: list[str], peer: Peer) -> None:
        self.sock = sock
        self.pairs = pairs
        self.peer = peer
        self.writer = FrameWriter(sock)
        self.lock = threading.Lock()


class PairRelay:
    """A pair's cache and its forwarder to the master target."""

    def __init__(self, server: ProcessServer, pair_id: str, mt_address: str) -> None:
        self.server = server
        self.pair_id = pair_id
        self.dir = server.cache_dir / pair_id
        self.cache = SegmentLog(self.dir)
        self.held = Held(server.budget, pool=server.pool)  # frames forwarded from memory (`ps_inflight.py`)
        self._stream: Stream | None = None  # while the link to the master target is up
        self._caching = False  # cache, not hold, until the forwarder caught up
        self._taking = threading.Lock()  # the receive thread's `take` against `spill_stalled`
        self._meta = self.dir / "meta.json"
        self.mt_acked = -1
        if self._meta.exists():
            meta = json.loads(self._meta.read_text())
            self.mt_acked = int(meta["mt_acked"])
            mt_address = mt_address or str(meta["master_target"])
        self.mt_address = mt_address
        self.mt_id = ""  # the master target's component id, once assigned (its certificate must match)
        self.size = 0
        self._save_meta()
        self.sessions: list[_Session] = []  # the agent's live sessions, newest last
        self.refusals = RefusalLog(pair_id, self.dir)
        self._take_over_damage()
        self._mt_writer: FrameWriter | None = None
        self._mt_lock = threading.Lock()
        self._mt_sock: ssl.SSLSocket | None = None
        self._mt_up = threading.Event()
        self._ended = threading.Event()
        self._thread = threading.Thread(target=self._forward_loop, name=f"ps-fwd-{pair_id}", daemon=True)
        self._thread.start()

    @property
    def _stopping(self) -> bool:
        return self.server.stopped.is_set() or self._ended.is_set()

    def discard(self) -> None:
        """The pair ended for good (commit, disable): stop forwarding and delete its cache."""
        self._ended.set()
        with self._mt_lock:
            sock = self._mt_sock
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(2)
        self._thread.join(timeout=10)
        self.held.spill()  # dropped: their memory goes back to the server's budget
        self.cache.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def _save_meta(self) -> None:
        tmp = self._meta.with_suffix(".tmp")
        tmp.write_text(json.dumps({"master_target": self.mt_address, "mt_acked": self.mt_acked}))
        os.replace(tmp, self._meta)

    @property
    def seen_seq(self) -> int:
        """Newest sequence this hop holds (cached, held in memory, or applied downstream)."""
        return max(self.cache.last_seq, self.mt_acked, self.held.last_seq)

    def synced_seq(self) -> int:
        """Sync the cache; the newest sequence durable with all before it: cached before the sync or
        applied downstream (never a held frame: held frames are newer than every cached one)."""
        last = self.cache.last_seq
        self.cache.sync()
        return max(last, self.mt_acked)

    def take(self, h: Header, frame: Frame, hbuf: bytearray) -> bool:
        """Hold a received data frame in memory (`ps_inflight.py`) or append it to the cache; True
        if cached (then the cache's sync acknowledges it; a held frame the master target's ACK)."""
        with self._taking:
            return self._take(h, frame, hbuf)

    def _take(self, h: Header, frame: Frame, hbuf: bytearray) -> bool:
        stream = self._stream
        if stream is not None and self._caching and stream.sent >= self.cache.last_seq:
            self._caching = False  # the forwarder caught up with the cache
        if stream is not None and not self._caching:
            buf = frame.buffer  # received into a buffer of its own (`Pool.place`): kept, not copied
            if buf is None:
                buf = bytearray(HEADER_SIZE + h.payload_len)
                buf[HEADER_SIZE:] = frame.wire
            pack_header(buf, h.type, h.flags, 0, h.seq, h.offset, h.length, h.payload_len, h.digest)
            if self.held.hold(h, buf):
                stream.wake()
                return False
            self._caching = True  # no room for ROOM_WAIT: cache until the forwarder caught up
        elif stream is None and not self._caching and self.cache.bytes_used > HOLD_BEHIND:
            self._caching = True  # the link is down for longer: its backlog goes first, cached
        self.spill()
        pack_header(hbuf, h.type, h.flags, 0, h.seq, h.offset, h.length, h.payload_len, h.digest)
        self.cache.append(h.seq, hbuf, frame.wire)
        return True

    def _idle(self) -> None:
        """The forwarder found nothing to send: spill stalled frames; with nothing held on the whole
        server, let the pool of frame buffers go."""
        self.spill_stalled()
        if self.server.pool.bytes and not self.server.budget.used:
            self.server.pool.clear()

    def spill_stalled(self) -> None:
        """Frames held that the master target has acknowledged none of for ROOM_WAIT (a paused or
        frozen pair) go to the cache and are acknowledged once it is synced (the forwarder's idle
        check; skipped while the receive thread is taking a frame: it spills itself then)."""
        if not self.held.stalled() or not self._taking.acquire(blocking=False):
            return
        try:
            self.spill()
            self._caching = True  # until the forwarder caught up: then held again
        finally:
            self._taking.release()
        self._relay_to_agent(FrameType.ACK, self.synced_seq(), 0, 0, memoryview(b""), every=True)

    def link_dropped(self) -> None:
        """The link to the master target dropped: the frames held go to the cache now — the receive
        thread would spill them only with the agent's next frame, which an idle agent may not send
        for long — and are acknowledged to the agent once the cache is synced."""
        if self._stopping or not len(self.held):
            return
        with self._taking:
            self.spill()
        self._relay_to_agent(FrameType.ACK, self.synced_seq(), 0, 0, memoryview(b""), every=True)

    def spill(self) -> None:
        """Append the frames held to the cache, in order (the next sync covers them)."""
        for h, buf in self.held.spill():
            if h.seq > self.mt_acked and h.seq > self.cache.last_seq:
                with memoryview(buf) as view:
                    self.cache.append(h.seq, view[:HEADER_SIZE], view[HEADER_SIZE:])

    def _take_over_damage(self) -> None:
        """Record the frames the cache lost to damage as refusals (persisted), to be resynced."""
        for damage in self.cache.damage:
            if damage.resumed_seq <= self.mt_acked + 1:
                # Every frame the damage can have held was applied downstream already.
                log.warning("damage in the cache of %s held only applied frames", self.pair_id)
                continue
            self.refusals.lost_frames(max(damage.after_seq, self.mt_acked) + 1, RefusedHop.CACHE)
        self.cache.clear_damage()

    def _repair_cache(self) -> None:
        """The forwarder met a bad frame header: skip the damage now, rather than at a restart."""
        if self.cache.repair():
            self._take_over_damage()
            self.request_refetch()

    def on_mt_ack(self, seq: int) -> None:
        if seq > self.mt_acked:
            self.mt_acked = seq
            self.cache.free_through(seq)
            self._save_meta()
            self.refusals.acked(seq)
            stream = self._stream  # buffers of frames it has sent may be reused (`Pool`)
            if self.held.release(seq, stream.sent if stream is not None else -1):
                # Frames held in memory are acknowledged only now: applied durably downstream.
                self._relay_to_agent(FrameType.ACK, seq, 0, 0, memoryview(b""), every=True)

    def on_mt_refused(self, seq: int) -> None:
        """The master target NACKed frame `seq`: resend an intact copy; drop a damaged one and ask
        the agent to read its range from the disk again (`healing.py`)."""
        held = self.held.find(seq)
        cached = memoryview(held) if held is not None else self._cached(seq)
        if self.refusals.refused_downstream(seq, cached):
            self.request_refetch()

    def _cached(self, seq: int) -> memoryview | None:
        cursor = self.cache.cursor(seq - 1)
        try:
            item = cursor.next(bytearray(HEADER_SIZE + MAX_PAYLOAD))
        except ProtocolError:
            item = None
        finally:
            cursor.close()
        return item[1] if item is not None and item[0].seq == seq else None

    def request_refetch(self) -> None:
        for e in self.refusals.pending_refetch():
            self._relay_to_agent(FrameType.REFETCH, e.seq, e.offset, e.length, memoryview(b""))
        for e in self.refusals.pending_resync():
            if e.hop is RefusedHop.CACHE:  # the agent found its own spool's loss itself
                self._relay_to_agent(FrameType.REFETCH, e.seq, 0, 0, memoryview(b""), Flag.RESYNC)

    def send_to_mt(self, ftype: FrameType, seq: int, payload: memoryview) -> bool:
        """Relay a query to the master target; False if the link stays down (the sender retries)."""
        self._mt_up.wait(5.0)
        with self._mt_lock:
            if self._mt_writer is None:
                return False
            try:
                self._mt_writer.send(ftype, pair=0, seq=seq, payload=payload)
            except OSError:
                return False
            return True

    def _relay_to_agent(
        self,
        ftype: FrameType,
        seq: int,
        offset: int,
        length: int,
        payload: memoryview,
        flags: Flag = Flag.NONE,
        every: bool = False,
    ) -> None:
        """Send to the agent's newest session, or to `every` live one (an ACK: whichever sent it)."""
        for session in list(self.sessions) if every else self.sessions[-1:]:
            with session.lock:
                try:
                    idx = session.pairs.index(self.pair_id)
                    session.writer.send(
                        ftype, pair=idx, seq=seq, offset=offset, length=length, payload=payload, flags=flags
                    )
                except (OSError, ValueError) as exc:
                    log.info("could not relay %s for %s to the agent: %s", ftype.name, self.pair_id, exc)

    def _forward_loop(self) -> None:
        PAIR_ID.set(self.pair_id)  # this thread's log lines name the pair
        backoff = Backoff(0.1, 2.0)  # jittered: pairs cut off together do not return together
        while not self._stopping:
            try:
                if self.mt_address:  # else: not assigned yet; the next reconcile or HELLO names it
                    self._forward_once()
                    backoff.reset()
            except (OSError, ProtocolError, ssl.SSLError) as exc:
                log.info("forwarding %s to %s interrupted: %s", self.pair_id, self.mt_address, exc)
            except Exception:
                # Never a silent death: a dead forwarder stalls the pair for good while the agent's
                # frames are still acknowledged. Log it whole and try again.
                log.exception("forwarding %s to %s failed", self.pair_id, self.mt_address)
            finally:
                self._mt_up.clear()
                with self._mt_lock:
                    self._mt_writer = None
                    sock, self._mt_sock = self._mt_sock, None
                if sock is not None:
                    sock.close()
            self._ended.wait(backoff.next())

    def _forward_once(self) -> None:
        sock = connect(self.mt_address, self.server.identity.client_context())
        try:
            check_server(sock, self.mt_address, PeerKind.MASTER_TARGET, self.mt_id, self.server.revoked)
        except ssl.SSLError:
            sock.close()
            raise
        with self._mt_lock:
            self._mt_sock = sock
        writer = FrameWriter(sock)
        reader = FrameReader(sock, MAX_PAYLOAD)
        writer.send_model(
            FrameType.HELLO, Hello(component=self.server.name, role=Role.PROCESS_SERVER, pairs=[self.pair_id])
        )
        first = reader.read()
        if first is None:
            raise ProtocolError("master target closed the session during HELLO")
        if first.header.type == FrameType.ERROR:
            err = decode_model(ErrorBody, first.payload)
            raise ProtocolError(f"master target refused {self.pair_id}: {err.code}: {err.message}")
        reply = decode_model(HelloReply, first.payload)
        self.on_mt_ack(reply.acked.get(self.pair_id, -1))
        with self._mt_lock:
            self._mt_writer = writer
        self._mt_up.set()
        broken = threading.Event()
        acks = threading.Thread(target=self._read_mt, args=(reader, sock, broken), daemon=True)
        acks.start()
        stream = Stream(self.cache, self.held, self.refusals, writer, self._mt_lock, self.mt_acked)
        try:
            self._stream = stream  # frames may be held in memory from now on (`take`)
            running = lambda: not self._stopping and not broken.is_set()  # noqa: E731
            stream.run(running, self._repair_cache, self.server.note_forwarded, self._idle)
        finally:
            self._stream = None
            sock.close()
            acks.join(timeout=5)
            self.link_dropped()

    def _read_mt(self, reader: FrameReader, sock: ssl.SSLSocket, broken: threading.Event) -> None:
        try:
            while True:
                frame = reader.read()
                if frame is None:
                    return
                h = frame.header
                if h.type == FrameType.ACK:
                    self.on_mt_ack(h.seq)
                elif h.type == FrameType.DIGESTS:
                    self._relay_to_agent(FrameType.DIGESTS, h.seq, h.offset, h.length, frame.payload)
                elif h.type == FrameType.NACK:
                    self.on_mt_refused(h.seq)
                    return
                elif h.type == FrameType.ERROR:
                    err = decode_model(ErrorBody, frame.payload)
                    log.warning("master target error for %s: %s", self.pair_id, err.message)
                    return
        except (OSError, ProtocolError) as exc:
            log.info("master target link for %s: %s", self.pair_id, exc)
        finally:
            broken.set()
            with contextlib.suppress(OSError):
                sock.shutdown(2)


class ProcessServer:
    def __init__(
        self, cache_dir: Path, identity: Identity, listen: str = "127.0.0.1:0", name: str = "process-server"
    ) -> None:
        self.cache_dir = cache_dir
        self.identity = identity
        self.name = name
        self.stopped = threading.Event()
        self._relays: dict[str, PairRelay] = {}
        self._discarded: set[str] = set()
        self._assigned: dict[str, RelayAssignment] = {}
        self.revoked = Revocations()
        self.peer_refusals = Refusals()
        self._lock = threading.Lock()
        self.budget = Budget()  # bytes of frames held in memory, over every pair
        self.pool = Pool()  # buffers of acknowledged frames, for the next ones received
        self._listener = Listener(listen, identity.server_context(), self._serve)
        self._received = 0
        self._forwarded = 0
        self._rate_in = 0.0
        self._rate_out = 0.0
        self._rate_at = time.monotonic()
        self._rate_marks = (0, 0)
        cache_dir.mkdir(parents=True, exist_ok=True)

    @property
    def address(self) -> str:
        return self._listener.address

    def start(self) -> None:
        # Resume forwarding whatever a previous run cached but the master target never acknowledged.
        for meta in sorted(self.cache_dir.glob("*/meta.json")):
            if valid_identifier(meta.parent.name):
                self._relay(meta.parent.name, "")
        self._listener.start()

    def stop(self) -> None:
        self.stopped.set()
        self._listener.stop()
        for relay in list(self._relays.values()):
            relay.cache.close()

    def _relay(self, pair_id: str, mt_address: str, assigned: RelayAssignment | None = None) -> PairRelay:
        with self._lock:
            relay = self._relays.get(pair_id)
            if relay is None:
                relay = PairRelay(self, pair_id, mt_address)
                self._relays[pair_id] = relay
            elif mt_address and mt_address != relay.mt_address:
                relay.mt_address = mt_address
            if assigned is not None:
                relay.mt_id, relay.size = assigned.master_target_id, assigned.size
            return relay

    def _authorise(self, peer: Peer, hello: Hello) -> tuple[str, Problem] | None:
        """Why this HELLO is refused (pair, problem), or None: the assigned agent, not revoked."""
        if peer.kind is not PeerKind.AGENT or hello.role != Role.AGENT:
            return "", not_authorised(peer, "send to a process server (only agents do)")
        if peer.serial in self.revoked:
            return "", not_authorised(peer, "connect: its certificate is revoked")
        for pair_id in hello.pairs:
            if valid_identifier(pair_id) and pair_id not in self._assigned:
                # Ended, or this process server has not heard of it yet: the agent retries.
                return pair_id, Problem(
                    code="pair-not-assigned",
                    message=f"Process server {self.name!r} relays no pair {pair_id!r} (yet).",
                    remediation="None if replication was just enabled: the agent retries.",
                )
            if not valid_identifier(pair_id) or self._assigned[pair_id].agent != peer.id:
                return pair_id, not_authorised(peer, f"send pair {pair_id!r}: it is not assigned to it")
        return None

    def reconcile(self, desired: ProcessServerDesired) -> None:
        """Take the assignments and revocations; drop the caches of pairs that ended for good."""
        self._assigned = {a.pair_id: a for a in desired.pairs}
        self.revoked.update(desired.revoked)
        for pair_id, assignment in self._assigned.items():
            if pair_id in self._relays:
                self._relay(pair_id, assignment.master_target, assignment)
        # A session whose agent was revoked or lost the pair ends now, not at its next HELLO.
        for live in list(self._relays.values()):
            now = self._assigned.get(live.pair_id)
            for session in list(live.sessions):
                if session.peer.serial in self.revoked or now is None or now.agent != session.peer.id:
                    with contextlib.suppress(OSError, ValueError):
                        session.sock.shutdown(2)
        for pair_id in desired.discard:
            if pair_id in self._discarded or not valid_identifier(pair_id):
                continue
            with self._lock:
                relay = self._relays.pop(pair_id, None)
            if relay is not None:
                relay.discard()
            else:
                shutil.rmtree(self.cache_dir / pair_id, ignore_errors=True)
            self._discarded.add(pair_id)
            log.info("discarded the cache of ended pair %s", pair_id)

    def note_forwarded(self, n: int) -> None:
        self._forwarded += n

    def _serve(self, sock: ssl.SSLSocket, address: str) -> None:
        peer = peer_of(sock, address)
        reader = FrameReader(sock)
        hello = read_hello(reader, peer)
        refusal = self._authorise(peer, hello)
        if refusal is not None:
            self._refuse(FrameWriter(sock), peer, refusal[1], refusal[0])
            return
        assigned = [self._assigned[p] for p in hello.pairs]
        relays = [self._relay(a.pair_id, a.master_target or hello.master_target or "", a) for a in assigned]
        session = _Session(sock, list(hello.pairs), peer)
        for relay in relays:
            relay.sessions.append(session)
        with session.lock:
            session.writer.send_model(
                FrameType.HELLO, HelloReply(acked={r.pair_id: r.synced_seq() for r in relays})
            )
        for relay in relays:
            relay.request_refetch()  # refusals the agent was not connected to hear about
        try:
            self._receive(reader, session, relays)
        finally:
            for relay in relays:
                relay.sessions.remove(session)

    def _refuse(self, writer: FrameWriter, peer: Peer, problem: Problem, pair_id: str = "") -> None:
        if problem.code == "pair-not-assigned":
            log.info("%s: %s", peer, problem.message)
        else:
            self.peer_refusals.add(peer, problem, pair_id)
        with contextlib.suppress(OSError):
            writer.send_model(
                FrameType.ERROR,
                ErrorBody.of(problem),
            )

    def _receive(self, reader: FrameReader, session: _Session, relays: list[PairRelay]) -> None:
        def ack(idx: int, seq: int) -> None:
            with session.lock:
                session.writer.send(FrameType.ACK, pair=idx, seq=seq)

        def broken() -> None:
            with contextlib.suppress(OSError):
                session.sock.shutdown(2)  # ends this session; the agent resends after HELLO

        # The cache is fsynced and the agent acknowledged on another thread (`ps_acks.py`); frames
        # held in memory are acknowledged on the master target's ACK instead (`PairRelay.on_mt_ack`).
        acker = Acker(relays[0].pair_id if relays else "", lambda i: relays[i].synced_seq(), ack, broken)
        try:
            self._receive_frames(reader, session, relays, acker)
        finally:
            acker.stop()

    def _receive_frames(
        self, reader: FrameReader, session: _Session, relays: list[PairRelay], acker: Acker
    ) -> None:
        hbuf = bytearray(HEADER_SIZE)
        touched: dict[int, int] = {}
        unacked = 0
        while True:
            try:
                frame = reader.read(self.pool.place)
            except CorruptFrame as exc:
                with session.lock:
                    session.writer.send(FrameType.NACK, pair=exc.pair, seq=exc.seq)
                if exc.pair < len(relays):
                    relays[exc.pair].refusals.agent_link(exc.seq)
                raise
            if frame is None:
                return
            h = frame.header
            if h.pair >= len(relays):
                raise ProtocolError(f"pair index {h.pair} outside the session's {len(relays)} pairs")
            relay = relays[h.pair]
            if h.type in _DATA_TYPES:
                problem = data_frame_problem(relay.pair_id, frame, relay.seen_seq, relay.size)
                if problem is not None:
                    # Refused before it is cached or acknowledged: the master target would drop it.
                    with session.lock:
                        self._refuse(session.writer, session.peer, problem, relay.pair_id)
                    raise ProtocolError(problem.message)
                if h.seq <= relay.seen_seq:
                    touched[h.pair] = h.seq  # a resent frame: acknowledged as far as durable
                else:
                    cached = relay.take(h, frame, hbuf)
                    relay.refusals.received(h)
                    self._received += HEADER_SIZE + h.payload_len
                    unacked += HEADER_SIZE + h.payload_len
                    if cached:
                        # The Acker syncs the cache and acknowledges it. A frame held in memory is
                        # acknowledged on the master target's ACK (or once spilled and synced):
                        # asking the Acker too cost an idle fdatasync and a repeated ACK, passed
                        # on by the agent's sender child to the agent, ~0.5 per MiB of a sync.
                        touched[h.pair] = h.seq
            elif h.type == FrameType.RESYNC_REQUEST:
                relay.send_to_mt(FrameType.RESYNC_REQUEST, h.seq, frame.payload)
            elif h.type == FrameType.HEARTBEAT:
                with session.lock:
                    session.writer.send(FrameType.HEARTBEAT)
            else:
                raise ProtocolError(f"unexpected {h.type.name} frame from an agent")
            if touched and (unacked >= ACK_EVERY_BYTES or idle(session.sock)):
                acker.request(touched)
                touched.clear()
                unacked = 0

    def stats(self) -> ProcessServerStats:
        relays = list(self._relays.values())
        held = sum(r.held.bytes for r in relays)
        used = sum(r.cache.bytes_used for r in relays)
        usage = shutil.disk_usage(self.cache_dir)
        free_pct = 100.0 * usage.free / usage.total if usage.total else 0.0
        health = CacheHealth.OK
        if free_pct < CRITICAL_FREE_PERCENT:
            health = CacheHealth.CRITICAL
        elif free_pct < WARNING_FREE_PERCENT:
            health = CacheHealth.WARNING
        now = time.monotonic()
        dt = now - self._rate_at
        if dt >= 1.0:
            rin, rout = self._rate_marks
            self._rate_in = (self._received - rin) / dt
            self._rate_out = (self._forwarded - rout) / dt
            self._rate_marks = (self._received, self._forwarded)
            self._rate_at = now
        drain = used / self._rate_out if self._rate_out > 0 and used else None
        return ProcessServerStats(
            cache_used_bytes=used,
            cache_capacity_bytes=usage.total,
            cache_free_percent=round(free_pct, 2),
            cache_health=health,
            backlog_bytes=used + held,
            held_bytes=held,
            throughput_bytes_per_s=self._rate_in,
            drain_seconds=drain,
            pairs=len(self._relays),
            refused_frames=[e for r in list(self._relays.values()) for e in r.refusals.entries()],
            refused_peers=self.peer_refusals.kept,
        )
