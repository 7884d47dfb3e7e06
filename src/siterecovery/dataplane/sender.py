"""Streams one pair from the agent to its process server: spool, syncs, acknowledgements.

It runs in the pair's sender child process (`sender_process.py`), on a `RemotePair`: the spool
read from the files the agent's export appends to, state changes asked of the agent.

A session opens with HELLO; the process server answers with the newest sequence it holds durably,
and the sender (re)sends everything after it: spooled frames captured before a pending sync, then
the sync's chunks, then the rest of the spool. The spool is freed only on the process server's
ACK. Any error (a NACK for a corrupt frame, a dropped link, a TLS failure) ends the session; the
sender reconnects with exponential backoff and resends what was not acknowledged (at least once).
"""

from __future__ import annotations

import base64
import contextlib
import logging
import os
import queue
import ssl
import threading
import time
from collections.abc import Callable, Iterator

from siterecovery.dataplane.blocks import COARSE, FINE, BlockHasher, BlockStream
from siterecovery.dataplane.links import connect
from siterecovery.dataplane.protocol import (
    HEADER_SIZE,
    MAX_PAYLOAD,
    Compressor,
    ErrorBody,
    Flag,
    FrameReader,
    FrameType,
    FrameWriter,
    Hello,
    HelloReply,
    ProtocolError,
    ResyncRequest,
    Role,
    decode_model,
    frame_intact,
    pack_header,
)
from siterecovery.dataplane.remote_pair import RemotePair
from siterecovery.dataplane.replica import SyncKind, SyncPlan
from siterecovery.dataplane.sync_source import Chunk, Progress, delta, delta_blocks, dirty_blocks, full_copy
from siterecovery.dataplane.trust import PeerKind, check_server
from siterecovery.logs import PAIR_ID
from siterecovery.retry import Backoff

log = logging.getLogger(__name__)

DIGEST_TIMEOUT = 300.0
DIGEST_RETRY = 5.0
BATCH_BYTES = 256 << 10
# Spooled frames are held back while the agent's export is saturated, for at most this long at a
# stretch (after that, frames go out while it stays saturated; the next hold needs a calm export
# first): downstream work during a burst is background, the spool absorbs the burst (a 1 GiB
# spool, then the dirty bitmap), and the RPO grows by at most this much. Writes that do not
# saturate the export (a sustained 100 MB/s) are never held.
HOLD_MAX = 10.0


class SessionEnded(ConnectionError):
    """The session broke (or the sender is stopping); reconnect and resend."""


class PairSender:
    def __init__(self, pair: RemotePair, context: Callable[[], ssl.SSLContext], component: str) -> None:
        self.pair = pair
        self._context = context  # made per session: a renewed certificate is used from the next one
        self._component = component
        self.stopped = threading.Event()
        self.last_error: str | None = None
        self._thread = threading.Thread(target=self._run, name=f"send-{pair.pair_id}", daemon=True)
        self._digests: queue.Queue[tuple[int, bytes]] = queue.Queue()
        self._broken = threading.Event()
        self._request_id = 0
        self._compressor = Compressor()
        self._progress: Progress | None = None
        self._dropped: set[int] = set()  # spooled frames found damaged: sent as MISSING (healing.py)
        self._hold_since: float | None = None  # the export saturated since then, frames held back
        self.clock: Callable[[], float] = time.monotonic

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self.stopped.set()
        with self.pair.changed:
            self.pair.changed.notify_all()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        PAIR_ID.set(self.pair.pair_id)  # this thread's log lines name the pair
        backoff = Backoff(0.1, 5.0)  # jittered: agents cut off together do not return together
        while not self.stopped.is_set():
            try:
                self._session()
                backoff.reset()
            except (OSError, ProtocolError, ssl.SSLError, queue.Empty) as exc:
                self.last_error = str(exc)
                log.info("replication of %s interrupted: %s", self.pair.pair_id, exc)
            self.stopped.wait(backoff.next())

    def _session(self) -> None:
        self.pair.refresh()  # revocations, lost frames, the pending sync, as the agent has them now
        sock = connect(self.pair.spec.process_server, self._context())
        try:
            # Only the assigned process server's certificate: never another kind of component.
            spec = self.pair.spec
            ps_id = spec.process_server_id
            check_server(sock, spec.process_server, PeerKind.PROCESS_SERVER, ps_id, self.pair.revoked)
            writer = FrameWriter(sock)
            reader = FrameReader(sock, MAX_PAYLOAD)
            writer.send_model(
                FrameType.HELLO,
                Hello(
                    component=self._component,
                    role=Role.AGENT,
                    pairs=[self.pair.pair_id],
                    master_target=self.pair.spec.master_target,
                ),
            )
            first = reader.read()
            if first is None:
                raise SessionEnded("process server closed the session during HELLO")
            if first.header.type == FrameType.ERROR:
                err = decode_model(ErrorBody, first.payload)
                raise SessionEnded(f"{err.code}: {err.message}")
            acked = decode_model(HelloReply, first.payload).acked.get(self.pair.pair_id, -1)
            self.pair.on_ack(acked)
            self._broken.clear()
            while not self._digests.empty():
                self._digests.get_nowait()
            acks = threading.Thread(target=self._read_acks, args=(reader, sock), daemon=True)
            acks.start()
            try:
                self._stream(writer, acked)
            finally:
                self._broken.set()
                with contextlib.suppress(OSError):
                    sock.shutdown(2)
                acks.join(timeout=5)
        finally:
            sock.close()

    def _read_acks(self, reader: FrameReader, sock: ssl.SSLSocket) -> None:
        # An ACK followed by more frames already decrypted is passed on with the last of them:
        # each one passed on is a message to the agent's process, whose GIL the export needs.
        # Acknowledgements only grow, so the newest says all the skipped ones said.
        acked: int | None = None
        try:
            while True:
                if acked is not None and sock.pending() < HEADER_SIZE:
                    self.pair.on_ack(acked)
                    acked = None
                frame = reader.read()
                if frame is None:
                    return
                h = frame.header
                if h.type == FrameType.ACK:
                    acked = h.seq
                    continue
                if acked is not None:  # before anything else the process server said
                    self.pair.on_ack(acked)
                    acked = None
                if h.type == FrameType.DIGESTS:
                    self._digests.put((h.seq, bytes(frame.payload)))
                elif h.type == FrameType.REFETCH and h.flags & Flag.RESYNC:
                    # Downstream lost frames of unknown ranges: compare the whole disk.
                    self.pair.resync_whole()
                elif h.type == FrameType.REFETCH:
                    # A downstream copy of this range was damaged: send it again from the disk.
                    self.pair.refetch(h.offset, h.length)
                elif h.type == FrameType.NACK:
                    self._refused(h.seq)
                    return
                elif h.type == FrameType.ERROR:
                    self.last_error = decode_model(ErrorBody, frame.payload).message
                    return
        except (OSError, ProtocolError) as exc:
            log.info("ack stream of %s: %s", self.pair.pair_id, exc)
        finally:
            if acked is not None:  # received before the stream ended: still acknowledged
                with contextlib.suppress(OSError):
                    self.pair.on_ack(acked)
            self._broken.set()
            with self.pair.changed:
                self.pair.changed.notify_all()

    def _refused(self, seq: int) -> None:
        """The process server refused frame `seq`: resend an intact spooled copy; a damaged one is
        replaced by a MISSING marker and its range is read from the disk again (a new write)."""
        cursor = self.pair.spool.cursor(seq - 1)
        try:
            item = cursor.next(bytearray(HEADER_SIZE + MAX_PAYLOAD))
        except ProtocolError:
            item = None
        finally:
            cursor.close()
        if item is None or item[0].seq != seq or frame_intact(item[1]):
            log.warning("process server refused frame %d of %s; resending", seq, self.pair.pair_id)
            return
        h = item[0]
        log.warning(
            "spooled frame %d of %s is damaged; re-reading [%d, +%d)",
            seq,
            self.pair.pair_id,
            h.offset,
            h.length,
        )
        self._dropped.add(seq)
        if h.type != FrameType.BOOKMARK and h.length:
            self.pair.refetch(h.offset, h.length)

    def _check(self) -> None:
        if self._broken.is_set() or self.stopped.is_set():
            raise SessionEnded("session ended")

    def _stream(self, writer: FrameWriter, acked: int) -> None:
        pair = self.pair
        cursor = pair.spool.cursor(acked)
        buf = bytearray(HEADER_SIZE + MAX_PAYLOAD)
        held = None
        sent: SyncPlan | None = None
        # Spooled frames go out in batches of up to BATCH_BYTES, flushed whenever the spool has
        # nothing more to send: one TLS record and syscall per 4 KiB write was most of the
        # sender's time under random writes, and its GIL time slowed the NBD export down.
        batched = _Batched(writer)
        out = FrameWriter(batched)
        lost = [s for s in pair.lost if s > acked]  # the spool lost frames before these
        try:
            while True:
                self._check()
                if held is None:
                    try:
                        held = cursor.next(buf)
                    except ProtocolError:
                        pair.repair_spool()  # a damaged header; the next session resumes past it
                        raise
                plan = pair.sync
                # A sync is sent once per session; it completes when its last frame is acknowledged.
                if plan is not None and plan is not sent and (held is None or held[0].seq > plan.s0):
                    sent = plan
                    batched.flush()  # the sync's frames go after those already produced
                    last = self._send_sync(writer, acked, bytearray(HEADER_SIZE + COARSE))
                    pair.sync_generated(last)
                    continue
                if held is None:
                    batched.flush()
                    # Never over a pending sync: its frames may not all be acknowledged yet.
                    if pair.dirty_mode and pair.sync is None and pair.acked >= pair.spool.last_seq:
                        pair.start_sync(SyncKind.DIRTY)
                        continue
                    with pair.changed:
                        pair.changed.wait(0.05)
                    continue
                if self._holding():
                    batched.flush()
                    self._wait_held()
                    continue
                header, raw = held
                held = None
                while lost and lost[0] < header.seq:
                    out.send(FrameType.WRITE, 0, lost.pop(0), 0, 0, b"", Flag.MISSING | Flag.RESYNC)
                if header.seq in self._dropped:
                    out.send(header.type, 0, header.seq, header.offset, header.length, b"", Flag.MISSING)
                    continue
                pair.bytes_sent += self._send_data(
                    out,
                    header.type,
                    header.seq,
                    header.offset,
                    header.length,
                    raw[HEADER_SIZE:],
                    header.flags,
                    header.digest,
                )
        finally:
            cursor.close()

    def _holding(self) -> bool:
        """Hold spooled frames back: the export is saturated, for less than HOLD_MAX so far."""
        now = self.clock()
        if not self.pair.export_saturated(now):
            self._hold_since = None
            return False
        if self._hold_since is None:
            self._hold_since = now
        return now - self._hold_since < HOLD_MAX

    def _wait_held(self) -> None:
        """Wait a moment while held back; the time goes into the tail's total (a bench reports it)."""
        began = self.clock()
        with self.pair.changed:
            self.pair.changed.wait(0.05)
        self.pair.tail.add_held(self.clock() - began)

    def _send_data(
        self,
        out: FrameWriter,
        ftype: FrameType,
        seq: int,
        offset: int,
        length: int,
        payload: memoryview,
        flags: Flag,
        digest: bytes,
    ) -> int:
        """Sends one data frame, its payload compressed when that pays (`Compressor`); the bytes sent."""
        compressed, wire = self._compressor.maybe_compress(payload)
        return out.send(ftype, 0, seq, offset, length, payload, flags | compressed, digest, wire)

    def _send_sync(self, writer: FrameWriter, acked: int, frame: bytearray) -> int | None:
        """Send the pending sync's chunks; each is read into `frame` after HEADER_SIZE bytes left for
        its header (`_send_block`). The sync's last sequence sent, or None."""
        pair = self.pair
        view = memoryview(frame)[HEADER_SIZE:]
        plan = pair.sync
        assert plan is not None
        fd = os.open(pair.image, os.O_RDONLY | os.O_CLOEXEC)
        stream: BlockStream | None = None
        batched = _Batched(writer)
        # Frames of a sync go out in batches: a delta resync is mostly single 4 KiB blocks.
        out = FrameWriter(batched)
        try:
            progress = Progress(pair.size)
            pair.bytes_total = pair.size
            start = plan.resume_offset(acked, COARSE)
            log.info(
                "%s sync of %s from offset %d (acknowledged %d)", plan.kind.value, pair.pair_id, start, acked
            )
            chunks: Iterator[Chunk]
            if plan.kind == SyncKind.FULL:
                chunks = full_copy(fd, pair.size, plan, start, view, progress)
            elif plan.kind == SyncKind.DELTA:
                stream = BlockStream(pair.image, pair.size, COARSE, FINE, first=start // COARSE)
                queries = _DigestQueries(self, batched)
                chunks = delta(
                    fd, stream, queries.ask, queries.answer, plan, start, view, progress, queries.hint
                )
            elif plan.kind == SyncKind.INTENT:
                blocks = pair.intent_bitmap().indexes()  # coarse blocks: the bitmap's granularity
                queries = _DigestQueries(self, batched)
                hasher = BlockHasher(pair.image, pair.size, COARSE, FINE)
                chunks = delta_blocks(
                    fd, hasher, blocks, queries.ask, queries.answer, plan, start, view, progress, queries.hint
                )
            else:
                chunks = dirty_blocks(fd, pair.sync_bitmap(), plan, start, view, progress)
            last: int | None = None
            for chunk in chunks:
                self._check()
                pair.bytes_done, pair.bytes_total = progress.done, progress.total
                if chunk.seq <= acked:
                    continue
                if chunk.zero:
                    pair.bytes_sent += out.send(
                        FrameType.BLOCK, 0, chunk.seq, chunk.offset, chunk.length, b"", Flag.ZERO
                    )
                else:
                    pair.bytes_sent += self._send_block(out, batched, frame, chunk)
                last = chunk.seq
            batched.flush()
            pair.bytes_done, pair.bytes_total = progress.done, progress.total
            log.info("%s sync of %s sent up to sequence %s", plan.kind.value, pair.pair_id, last)
            return last
        finally:
            if stream is not None:
                stream.close()
            os.close(fd)

    def _send_block(self, out: FrameWriter, batched: _Batched, frame: bytearray, chunk: Chunk) -> int:
        """A sync's data chunk, read into `frame` after HEADER_SIZE bytes: uncompressed, its header is
        put in front and the frame sent in one write (a separate header cost a TLS record and a
        system call of its own per MiB, on both ends); compressed, as any frame. The bytes sent."""
        payload = memoryview(frame)[HEADER_SIZE : HEADER_SIZE + chunk.length]
        compressed, wire = self._compressor.maybe_compress(payload)
        if compressed:
            return out.send(
                FrameType.BLOCK,
                0,
                chunk.seq,
                chunk.offset,
                chunk.length,
                payload,
                compressed,
                chunk.digest,
                wire,
            )
        n = chunk.length
        pack_header(frame, FrameType.BLOCK, Flag.NONE, 0, chunk.seq, chunk.offset, n, n, chunk.digest)
        with memoryview(frame)[: HEADER_SIZE + n] as whole:
            batched.sendall(whole)
        return HEADER_SIZE + n


class _Batched:
    """Gathers small frames into one TLS write of up to BATCH_BYTES; large writes pass through."""

    def __init__(self, writer: FrameWriter) -> None:
        self.writer = writer
        self._buf = bytearray()

    def sendall(self, data: memoryview | bytes | bytearray) -> None:
        if len(data) >= BATCH_BYTES:
            self.flush()
            self.writer.send_raw(memoryview(data))
            return
        self._buf += data
        if len(self._buf) >= BATCH_BYTES:
            self.flush()

    def flush(self) -> None:
        if self._buf:
            with memoryview(self._buf) as view:
                self.writer.send_raw(view)
            self._buf.clear()


class _DigestQueries:
    """A delta resync's digest queries to the master target (through the process server).

    Several are in flight at once; answers come back in order and are kept until asked for.
    Unanswered requests are sent again every DIGEST_RETRY seconds: the process server relays
    queries only while its link to the master target is up, and drops them otherwise.
    """

    def __init__(self, sender: PairSender, batched: _Batched) -> None:
        self._sender = sender
        self._batched = batched
        self._asked: dict[int, ResyncRequest] = {}
        self._answers: dict[int, bytes] = {}

    def _send(self, rid: int, req: ResyncRequest) -> None:
        self._batched.flush()  # the request goes after the frames already produced
        self._sender.pair.bytes_sent += self._batched.writer.send_model(
            FrameType.RESYNC_REQUEST, req, seq=rid
        )

    def ask(self, blocks: list[int], have: bytes) -> int:
        self._sender._request_id += 1
        rid = self._sender._request_id
        req = ResyncRequest(
            coarse=COARSE, fine=FINE, blocks=blocks, have=base64.b64encode(have).decode("ascii")
        )
        self._asked[rid] = req
        self._send(rid, req)
        return rid

    def hint(self, ranges: list[tuple[int, int]]) -> None:
        """Tell the master target the ranges about to be sent (it reads what they replace ahead)."""
        flat = [n for offset, stop in ranges for n in (offset, stop - offset)]
        self._send(0, ResyncRequest(coarse=COARSE, fine=FINE, prefetch=flat))

    def answer(self, rid: int) -> bytes:
        self._batched.flush()  # the master target applies what we sent while we wait
        deadline = time.monotonic() + DIGEST_TIMEOUT
        resend = time.monotonic() + DIGEST_RETRY
        while rid not in self._answers:
            self._sender._check()
            now = time.monotonic()
            if now > deadline:
                raise SessionEnded(f"no digests from the master target within {DIGEST_TIMEOUT:.0f} s")
            if now > resend:
                for again in sorted(r for r in self._asked if r >= rid):
                    self._send(again, self._asked[again])
                resend = now + DIGEST_RETRY
            try:
                got, payload = self._sender._digests.get(timeout=0.5)
            except queue.Empty:
                continue
            if got in self._asked:
                self._answers[got] = payload
        del self._asked[rid]
        return self._answers.pop(rid)
