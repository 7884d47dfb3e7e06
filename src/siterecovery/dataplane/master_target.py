"""The master target: applies process servers' streams to its attached target disks (MT-1).

Disks are attached from the desired state (`MasterTargetDesired`); at most 60 at once over all
machines (MT-3: the 61st is refused with `mt-disk-limit`). A session from a process server names
its pairs in HELLO and learns each pair's durable sequence, after which the process server resends
only newer frames. A receive thread reads and verifies frames ahead into a bounded inbox
(`mt_inbox.py`) while the session's thread applies them through the pair's `DiskApplier`
(idempotent by sequence) and acknowledges them only after `sync()`: the replica's writes and
fdatasyncs no longer stop the reading. With a retention volume each pair's applier is a
retention journal, so BOOKMARK frames become recovery points; the desired state can then move a
disk to a point in place or ask for copies of points (`mt_points.py`). A full retention volume
pauses a pair without acknowledging: the frame is retried until it applies. The master target also
answers resync requests with the block digests of its target disks.

A session is accepted only from the process server each of its pairs is assigned to (the desired
state's `process_server`), never from another kind of certificate or a revoked one, and a data
frame outside the disk or too far ahead of the pair's sequence ends the session (`trust.py`).
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import ssl
import threading
import time
from collections.abc import Callable
from pathlib import Path

import siterecovery
from siterecovery.dataplane.apply import ApplierFactory, DirectApplier, DiskApplier, direct_applier
from siterecovery.dataplane.assignments import (
    AttachedDisk,
    MasterTargetDesired,
    MasterTargetStats,
    RefusedDisk,
    RetentionVolume,
)
from siterecovery.dataplane.direct_write import POOL
from siterecovery.dataplane.healing import Gaps
from siterecovery.dataplane.journal import JournaledDisk, journaled_applier_factory
from siterecovery.dataplane.links import Identity, Listener
from siterecovery.dataplane.mt_inbox import Inbox, Received, Receiver
from siterecovery.dataplane.mt_pair import TargetPair, durable_seq
from siterecovery.dataplane.mt_points import (
    Copier,
    describe_volumes,
    find_point,
    no_journal,
)
from siterecovery.dataplane.points import NO_CRASH_POINTS
from siterecovery.dataplane.protocol import (
    Bookmark,
    CorruptFrame,
    ErrorBody,
    Flag,
    Frame,
    FrameReader,
    FrameType,
    FrameWriter,
    Hello,
    HelloReply,
    ProtocolError,
    ResyncRequest,
    Role,
    decode_model,
    read_hello,
)
from siterecovery.dataplane.target_digests import TargetDigests
from siterecovery.dataplane.trust import (
    NOT_AUTHORISED,
    Peer,
    PeerKind,
    Refusals,
    Revocations,
    child,
    data_frame_problem,
    not_authorised,
    peer_of,
    valid_identifier,
)
from siterecovery.errors import Problem, SiteRecoveryError

log = logging.getLogger(__name__)

MAX_ATTACHED_DISKS = 60
ACK_EVERY_BYTES = 32 << 20
# Group commit: while frames keep coming, sync and acknowledge at most this often (each sync is an
# fdatasync of the replica's scattered pages and of the journal; one per few frames cost the master
# target more CPU than applying them). A frame after a quiet spell is acknowledged at once.
ACK_MIN_SECONDS = 0.1
JOURNAL_DIR = "siterecovery-journal"
RECEIVER_JOIN_SECONDS = 10.0  # a session's end waits this long for its receive thread
RETRY_SECONDS = 2.0  # how often a paused pair tries applying again
REDISCOVER_SECONDS = 900.0  # retention volumes are described again this often (and on `refresh`)
# Errors that pause applying a pair instead of failing the session: the frame is retried.
_PAUSE_CODES = frozenset({"retention-volume-full", "target-volume-full", "disk-not-at-latest"})


def disk_limit_error(pair_id: str, attached: int) -> SiteRecoveryError:
    return SiteRecoveryError(
        Problem(
            code="mt-disk-limit",
            message=(
                f"Attaching disk of pair {pair_id!r} would give the master target "
                f"{attached + 1} disks; at most {MAX_ATTACHED_DISKS} may be attached."
            ),
            remediation="Fail back or disable some pairs on this master target, or deploy another one.",
            rule="MT-3",
        )
    )


class _SessionEnds(Exception):
    """The session must end so the process server resends from the durable sequence."""

    def __init__(self, problem: Problem) -> None:
        super().__init__(problem.message)
        self.problem = problem


class MasterTarget:
    """Applies process servers' streams; materialises recovery points; describes retention volumes.

    Without an explicit `applier_factory`, pairs are applied through a retention journal under
    `<retention volume>/siterecovery-journal/<pair_id>` when a retention volume is known (the
    desired state's, else `retention_volume`), and directly to the disk otherwise.
    """

    def __init__(
        self,
        state_dir: Path,
        identity: Identity,
        listen: str = "127.0.0.1:0",
        *,
        retention_volume: Path | None = None,
        volumes: tuple[Path, ...] = (),
        applier_factory: ApplierFactory | None = None,
        retention_quota: int | None = None,
        name: str = "master-target",
        place: Callable[[AttachedDisk], AttachedDisk] | None = None,
    ) -> None:
        self.state_dir = state_dir
        self.identity = identity
        self.name = name
        self.retention_volume = retention_volume
        self.volumes = volumes
        self.retention_quota = retention_quota
        self._factory = applier_factory
        # Where an attached disk's path really is (a datastore path's local VMDK extent, vmdk.py).
        self._place = place
        self._desired = MasterTargetDesired()
        self._pairs: dict[str, TargetPair] = {}
        self._refused: dict[str, RefusedDisk] = {}
        self._discarded: set[str] = set()
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._volumes: list[RetentionVolume] = []
        self._discovered_at = float("-inf")
        self._refresh_seen: int | None = None
        self._targets_seen: tuple[str, ...] = ()
        self._copier = Copier(state_dir, self._lookup)
        self.revoked = Revocations()
        self.peer_refusals = Refusals()
        self._listener = Listener(listen, identity.server_context(), self._serve)

    @property
    def address(self) -> str:
        return self._listener.address

    def start(self) -> None:
        self._copier.start()
        self._listener.start()

    def stop(self) -> None:
        self._stopped.set()
        self._listener.stop()
        self._copier.stop()
        with self._lock:
            pairs = list(self._pairs.values())
            self._pairs.clear()
        for pair in pairs:
            self._close(pair)

    # ---- desired state ------------------------------------------------------------------------

    def _applier_factory(self) -> ApplierFactory:
        if self._factory is not None:
            return self._factory
        volume = self._desired.retention_volume or self.retention_volume
        if volume is None:
            return direct_applier
        return journaled_applier_factory(
            volume / JOURNAL_DIR, self._desired.retention_seconds, NO_CRASH_POINTS, self.retention_quota
        )

    def attach(self, disk: AttachedDisk) -> None:
        """Attach a target disk; refuses beyond 60 attached disks (MT-3)."""
        if self._place is not None:
            disk = self._place(disk)
        with self._lock:
            if disk.pair_id in self._pairs:
                self._pairs[disk.pair_id].disk = disk
                return
            if len(self._pairs) >= MAX_ATTACHED_DISKS:
                raise disk_limit_error(disk.pair_id, len(self._pairs))
            pair_state = child(self.state_dir / "pairs", disk.pair_id)
            applier = self._applier_factory()(disk.pair_id, disk.path, disk.size, pair_state)
            digests = None
            if TargetPair.keeps_digests(applier):
                digests = TargetDigests(pair_state / "digests", disk.path, disk.size)
            self._pairs[disk.pair_id] = TargetPair(disk, applier, Gaps(pair_state), digests)

    def reconcile(self, desired: MasterTargetDesired) -> None:
        """Attach, detach, move disks to their points, queue copies, describe volumes (idempotent)."""
        self._desired = desired
        self.revoked.update(desired.revoked)
        wanted = {d.pair_id for d in desired.disks}
        with self._lock:
            gone = [self._pairs.pop(p) for p in list(self._pairs) if p not in wanted]
        for pair in gone:
            self._close(pair)
        self._discard(desired.discard)
        refused: dict[str, RefusedDisk] = {}
        for disk in desired.disks:
            try:
                self.attach(disk)
            except SiteRecoveryError as exc:
                refused[disk.pair_id] = RefusedDisk(
                    pair_id=disk.pair_id, code=exc.first.code, message=exc.first.message
                )
        self._refused = refused
        for pair in list(self._pairs.values()):
            self._follow_point(pair)
            link = pair.link
            # A session whose process server was revoked or lost the pair ends now.
            moved = link is not None and link[0].id != pair.disk.process_server
            if link is not None and (moved or link[0].serial in self.revoked):
                with contextlib.suppress(OSError, ValueError):
                    link[1].shutdown(2)
        self._copier.request(desired.copies)
        stale = time.monotonic() - self._discovered_at > REDISCOVER_SECONDS
        targets = tuple(sorted(str(p.disk.path) for p in self._pairs.values()))
        # Attaching or detaching disks changes which volumes hold replication targets.
        if desired.refresh != self._refresh_seen or stale or targets != self._targets_seen:
            self._refresh_seen, self._targets_seen = desired.refresh, targets
            self._discover()

    def _discard(self, pair_ids: list[str]) -> None:
        """Delete the journals and state of pairs that ended: nothing can restore them any more."""
        for pair_id in pair_ids:
            if pair_id in self._discarded or pair_id in self._pairs or not valid_identifier(pair_id):
                continue
            for volume in {
                v for v in (self._desired.retention_volume, self.retention_volume, *self.volumes) if v
            }:
                shutil.rmtree(volume / JOURNAL_DIR / pair_id, ignore_errors=True)
            shutil.rmtree(self.state_dir / "pairs" / pair_id, ignore_errors=True)
            self._discarded.add(pair_id)
            log.info("discarded the journal of ended pair %s", pair_id)

    def _close(self, pair: TargetPair) -> None:
        with pair.lock:
            pair.detached = True
            try:
                pair.sync()
            except SiteRecoveryError as exc:
                log.warning("detaching %s: %s", pair.disk.pair_id, exc.first.message)
                if pair.digests is not None:
                    pair.digests.forget()
            pair.close()

    def _follow_point(self, pair: TargetPair) -> None:
        """Materialise the pair in place at its desired point, or roll it forward to latest."""
        want = pair.disk.point
        applier = pair.applier
        if not isinstance(applier, JournaledDisk):
            if want is not None:
                pair.paused = no_journal(pair.disk.pair_id).first.code
            return
        with pair.lock:
            if pair.detached:
                return
            try:
                applier.set_retention(self._desired.retention_seconds)
                at_latest = want is None and applier.at_latest
                moving = not at_latest and (want is None or pair.position != want)
                if moving and pair.digests is not None:
                    pair.digests.forget()  # the replica's bytes move outside the applied stream
                if want is None:
                    if not applier.at_latest:
                        result = applier.roll_forward_to(applier.latest_point())
                        log.info(
                            "rolled %s forward to latest (%d bytes)", pair.disk.pair_id, result.bytes_moved
                        )
                    pair.position = "latest"
                elif pair.position != want:
                    result = applier.materialise_in_place(find_point(applier, want))
                    log.info("materialised %s at %s (%d bytes)", pair.disk.pair_id, want, result.bytes_moved)
                    pair.position = want
                if pair.paused in ("recovery-point-unavailable", "recovery-point-unusable"):
                    pair.paused = ""
            except SiteRecoveryError as exc:
                log.warning("cannot materialise %s at %s: %s", pair.disk.pair_id, want, exc.first.message)
                pair.paused = exc.first.code

    def _lookup(self, pair_id: str) -> tuple[DiskApplier, threading.Lock] | None:
        pair = self._pairs.get(pair_id)
        return None if pair is None or pair.detached else (pair.applier, pair.lock)

    def _discover(self) -> None:
        candidates: list[Path] = []
        for v in (self._desired.retention_volume, self.retention_volume, *self.volumes):
            if v is not None and v not in candidates:
                candidates.append(v)
        targets = [p.disk.path for p in self._pairs.values()]
        install = Path(siterecovery.__file__).parent
        self._volumes = describe_volumes(candidates, targets, [self.state_dir, install])
        self._discovered_at = time.monotonic()

    # ---- sessions -----------------------------------------------------------------------------

    def _authorise(self, peer: Peer, hello: Hello) -> tuple[str, Problem] | None:
        """Why this HELLO is refused (pair, problem), or None: the assigned process server, not revoked."""
        if peer.kind is not PeerKind.PROCESS_SERVER or hello.role != Role.PROCESS_SERVER:
            return "", not_authorised(peer, "send to a master target (only process servers do)")
        if peer.serial in self.revoked:
            return "", not_authorised(peer, "connect: its certificate is revoked")
        assigned = {d.pair_id: d.process_server for d in self._desired.disks}
        for pair_id in hello.pairs:
            if valid_identifier(pair_id) and pair_id not in assigned:
                # No longer (or not yet) held here: a process server's leftover backlog, not an attack.
                return pair_id, self._refusal(pair_id)
            if not valid_identifier(pair_id) or assigned[pair_id] != peer.id:
                return pair_id, not_authorised(peer, f"send pair {pair_id!r}: it is not assigned to it")
        return None

    def _serve(self, sock: ssl.SSLSocket, address: str) -> None:
        peer = peer_of(sock, address)
        reader = FrameReader(sock)
        writer = FrameWriter(sock)
        hello = read_hello(reader, peer)
        refusal = self._authorise(peer, hello)
        if refusal is not None:
            p = refusal[1]
            if p.code == NOT_AUTHORISED:
                self.peer_refusals.add(peer, p, refusal[0])
            writer.send_model(FrameType.ERROR, ErrorBody.of(p))
            return
        pairs: list[tuple[TargetPair, int]] = []
        acked: dict[str, int] = {}
        for pair_id in hello.pairs:
            pair = self._pairs.get(pair_id)
            if pair is None or pair.detached:
                problem = self._refusal(pair_id)
                writer.send_model(
                    FrameType.ERROR,
                    ErrorBody.of(problem),
                )
                return
            with pair.lock:
                pair.session += 1
                pair.link = (peer, sock)
                self._sync(pair)
                # Resume after what is durable: anything applied but not committed is redone.
                pair.seen = pair.applier.applied_seq
                acked[pair_id] = pair.last_ack = durable_seq(pair.applier)
            pairs.append((pair, pair.session))
        writer.send_model(FrameType.HELLO, HelloReply(acked=acked))
        inbox = Inbox()
        digested = frozenset(i for i, (pair, _session) in enumerate(pairs) if pair.digests is not None)
        receiver = Receiver(reader, inbox, address, digested)
        receiver.start()
        try:
            self._apply_stream(inbox, writer, pairs, peer)
        except _SessionEnds as end:
            p = end.problem
            writer.send_model(FrameType.ERROR, ErrorBody.of(p))
        finally:
            # The receive thread may be blocked reading: shutdown wakes it (close alone does not).
            inbox.close()
            with contextlib.suppress(OSError, ValueError):
                sock.shutdown(2)
            receiver.join(RECEIVER_JOIN_SECONDS)

    def _refusal(self, pair_id: str) -> Problem:
        refused = self._refused.get(pair_id)
        if refused is not None and refused.code == "mt-disk-limit":
            return disk_limit_error(pair_id, len(self._pairs)).first
        return Problem(
            code="mt-disk-not-attached",
            message=f"Pair {pair_id!r} has no target disk attached to master target {self.name!r}.",
            remediation="Enable replication (or reprotect) so the disk is attached, then retry.",
        )

    def _sync(self, pair: TargetPair) -> None:
        """Sync under the pair's lock; a full volume pauses the pair (the journal undid the batch)."""
        try:
            pair.sync()
        except SiteRecoveryError as exc:
            if exc.first.code not in _PAUSE_CODES:
                raise
            pair.paused = exc.first.code

    def _apply_stream(
        self, inbox: Inbox, writer: FrameWriter, pairs: list[tuple[TargetPair, int]], peer: Peer
    ) -> None:
        """Apply the frames the receive thread queued, in order; sync and acknowledge in groups."""
        touched: set[int] = set()
        pending = 0
        acked_at = 0.0  # time.monotonic() of the last acknowledgement
        while True:
            item = inbox.get()
            if isinstance(item, CorruptFrame):
                writer.send(FrameType.NACK, pair=item.pair, seq=item.seq)
                raise item
            if isinstance(item, BaseException):
                raise item
            if not isinstance(item, Received):
                return  # the stream ended between frames
            frame = item.frame
            h = frame.header
            if h.pair >= len(pairs):
                raise ProtocolError(f"pair index {h.pair} outside the session's {len(pairs)} pairs")
            pair, session = pairs[h.pair]
            if h.type in (FrameType.WRITE, FrameType.BLOCK, FrameType.BOOKMARK):
                problem = data_frame_problem(pair.disk.pair_id, frame, pair.seen, pair.disk.size)
                if problem is not None:
                    raise _SessionEnds(self.peer_refusals.add(peer, problem, pair.disk.pair_id))
                size = len(frame.payload)  # applied, a pooled payload may go back to the pool
                if not self._try_apply(pair, session, frame, item.fines):
                    # Paused: acknowledge what is durable, then retry this frame until it applies.
                    self._ack(writer, pairs, touched | {h.pair})
                    touched.clear()
                    pending = 0
                    while not self._try_apply(pair, session, frame, item.fines):
                        if self._stopped.wait(RETRY_SECONDS):
                            return
                touched.add(h.pair)
                pending += size
            elif h.type == FrameType.RESYNC_REQUEST:
                self._answer_resync(writer, h.pair, h.seq, pair, decode_model(ResyncRequest, frame.payload))
            elif h.type == FrameType.HEARTBEAT:
                writer.send(FrameType.HEARTBEAT)
            else:
                raise ProtocolError(f"unexpected {h.type.name} frame from a process server")
            if touched and (
                pending >= ACK_EVERY_BYTES or inbox.quiet_for(acked_at + ACK_MIN_SECONDS - time.monotonic())
            ):
                self._ack(writer, pairs, touched)
                touched.clear()
                pending = 0
                acked_at = time.monotonic()

    def _try_apply(self, pair: TargetPair, session: int, frame: Frame, fines: bytes | None = None) -> bool:
        """Apply one data frame (idempotent by sequence); False while the pair is paused."""
        h = frame.header
        with pair.lock:
            if pair.detached:
                raise _SessionEnds(self._refusal(pair.disk.pair_id))
            if pair.session != session:
                raise _SessionEnds(
                    Problem(
                        code="session-superseded",
                        message=f"A newer session applies pair {pair.disk.pair_id!r}.",
                        remediation="None: the process server already reconnected.",
                    )
                )
            if h.seq <= pair.seen:
                return True
            if pair.disk.point is not None or pair.disk.frozen:
                return False  # materialised at a chosen point, or held: nothing new is applied
            store = pair.digests
            try:
                if store is not None and h.type != FrameType.BOOKMARK and not h.flags & Flag.MISSING:
                    store.before_write(h.offset, h.length)
                if h.flags & Flag.MISSING:
                    # A refused frame dropped upstream: its sequence passes with nothing written,
                    # and points are unusable until the re-read of its range arrives.
                    pair.gaps.open(h.seq, h.offset, h.length, whole=bool(h.flags & Flag.RESYNC))
                    pair.applier.apply_write(h.seq, h.offset, memoryview(b""))
                elif h.type == FrameType.BOOKMARK:
                    bm = decode_model(Bookmark, frame.payload)
                    pair.applier.bookmark(h.seq, bm.tag, bm.kind.name.lower(), bm.timestamp)
                    pair.gaps.point(h.seq)
                elif h.flags & Flag.ZERO:
                    pair.applier.apply_zero(h.seq, h.offset, h.length)
                    if store is not None:
                        store.zeroed(h.offset, h.length)
                else:
                    if store is not None:  # first: a journal may give the payload's buffer back
                        store.wrote(h.offset, frame.payload, fines)
                    if isinstance(pair.applier, JournaledDisk):
                        # The receive thread copied the payload into a buffer of its own: the
                        # journal keeps it until written instead of copying it again.
                        pair.applier.apply_write(h.seq, h.offset, frame.payload, owned=True)
                    else:
                        pair.applier.apply_write(h.seq, h.offset, frame.payload)
                        if isinstance(pair.applier, DirectApplier) and POOL.owns(frame.payload):
                            POOL.give(frame.payload)  # written at once: the buffer can be refilled
                    if h.flags & Flag.REFETCH:
                        pair.gaps.refetched(h.offset, h.length)
            except SiteRecoveryError as exc:
                if store is not None:
                    store.forget_unflushed()  # the journal may have undone the batch
                if exc.first.code not in _PAUSE_CODES:
                    raise
                if exc.first.code != "disk-not-at-latest":
                    pair.paused = exc.first.code
                if pair.applier.applied_seq < pair.seen:
                    # The volume filled mid-batch and the journal undid it: the process server
                    # must resend from the durable sequence.
                    pair.seen = pair.applier.applied_seq
                    raise _SessionEnds(exc.first) from exc
                return False
            pair.seen = h.seq
            pair.paused = ""
            pair.last_applied_time = time.time()
            return True

    def _ack(self, writer: FrameWriter, pairs: list[tuple[TargetPair, int]], touched: set[int]) -> None:
        """Sync the touched pairs and acknowledge what each holds durably."""
        for idx in touched:
            p, _session = pairs[idx]
            with p.lock:
                if p.detached:
                    continue
                before = p.seen
                self._sync(p)
                seq = durable_seq(p.applier)
                undone = p.applier.applied_seq < before
                p.seen = p.applier.applied_seq
                send = seq > p.last_ack
                p.last_ack = max(p.last_ack, seq)
            if send:
                writer.send(FrameType.ACK, pair=idx, seq=seq)
            if undone:
                raise _SessionEnds(
                    Problem(
                        code=p.paused or "retention-volume-full",
                        message=f"Applying pair {p.disk.pair_id!r} is paused; resend from sequence {seq}.",
                        remediation="Free space on the retention volume; applying resumes by itself.",
                    )
                )

    def _answer_resync(
        self, writer: FrameWriter, idx: int, seq: int, pair: TargetPair, req: ResyncRequest
    ) -> None:
        """Digests of the target disk for a resync request (from the pair's digest store)."""
        if req.prefetch is not None:
            pair.prefetch(req.prefetch)  # a hint: never answered
            return
        payload = pair.answer(req, lambda: self._sync(pair))
        writer.send(FrameType.DIGESTS, pair=idx, seq=seq, payload=payload)

    def stats(self) -> MasterTargetStats:
        now = time.time()  # one instant for every pair: they list the same thinned points
        pairs = [p.stats(now) for p in list(self._pairs.values())]
        return MasterTargetStats(
            pairs=pairs,
            attached_disks=len(pairs),
            refused=list(self._refused.values()),
            retention_volumes=self._volumes,
            retention_full=any(p.paused == "retention-volume-full" for p in pairs),
            copies_done=self._copier.results,
            refused_peers=self.peer_refusals.kept,
        )
