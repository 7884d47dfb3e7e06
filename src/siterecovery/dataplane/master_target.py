"""The master target: applies process servers' streams to its attached target disks (MT-1).

Disks are attached from the desired state (`MasterTargetDesired`); at most 60 at once over all
machines (MT-3: the 61st is refused with `mt-disk-limit`). A session from a process server names
its pairs in HELLO and learns each pair's applied sequence, after which the process server resends
only newer frames. Frames are verified, applied through the pair's `DiskApplier` (idempotent by
sequence), and acknowledged only after `sync()`. The master target also answers resync requests
with the block digests of its target disks.
"""

from __future__ import annotations

import logging
import os
import shutil
import ssl
import threading
import time
from pathlib import Path

from siterecovery.dataplane.apply import ApplierFactory, DiskApplier, direct_applier
from siterecovery.dataplane.assignments import (
    AttachedDisk,
    MasterTargetDesired,
    MasterTargetPairStats,
    MasterTargetStats,
    RefusedDisk,
    RetentionVolume,
)
from siterecovery.dataplane.blocks import BlockHasher
from siterecovery.dataplane.links import Identity, Listener, idle
from siterecovery.dataplane.protocol import (
    Bookmark,
    CorruptFrame,
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
)
from siterecovery.errors import Problem, SiteRecoveryError

log = logging.getLogger(__name__)

MAX_ATTACHED_DISKS = 60
ACK_EVERY_BYTES = 32 << 20


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


class _Pair:
    def __init__(self, disk: AttachedDisk, applier: DiskApplier) -> None:
        self.disk = disk
        self.applier = applier
        self.lock = threading.Lock()
        self.seen = applier.applied_seq
        self.last_applied_time: float | None = None
        self.hasher: BlockHasher | None = None


class MasterTarget:
    def __init__(
        self,
        state_dir: Path,
        identity: Identity,
        listen: str = "127.0.0.1:0",
        applier_factory: ApplierFactory = direct_applier,
        retention_volumes: tuple[Path, ...] = (),
        name: str = "master-target",
    ) -> None:
        self.state_dir = state_dir
        self.identity = identity
        self.name = name
        self.retention_volumes = retention_volumes
        self._factory = applier_factory
        self._pairs: dict[str, _Pair] = {}
        self._refused: dict[str, RefusedDisk] = {}
        self._lock = threading.Lock()
        self._listener = Listener(listen, identity.server_context(), self._serve)

    @property
    def address(self) -> str:
        return self._listener.address

    def start(self) -> None:
        self._listener.start()

    def stop(self) -> None:
        self._listener.stop()

    def attach(self, disk: AttachedDisk) -> None:
        """Attach a target disk; refuses beyond 60 attached disks (MT-3)."""
        with self._lock:
            if disk.pair_id in self._pairs:
                return
            if len(self._pairs) >= MAX_ATTACHED_DISKS:
                raise disk_limit_error(disk.pair_id, len(self._pairs))
            pair_state = self.state_dir / "pairs" / disk.pair_id
            applier = self._factory(disk.pair_id, disk.path, disk.size, pair_state)
            self._pairs[disk.pair_id] = _Pair(disk, applier)

    def reconcile(self, desired: MasterTargetDesired) -> None:
        """Attach what the desired state lists, detach what it no longer lists (idempotent)."""
        wanted = {d.pair_id for d in desired.disks}
        with self._lock:
            for pair_id in [p for p in self._pairs if p not in wanted]:
                pair = self._pairs.pop(pair_id)
                with pair.lock:
                    pair.applier.sync()
        refused: dict[str, RefusedDisk] = {}
        for disk in desired.disks:
            try:
                self.attach(disk)
            except SiteRecoveryError as exc:
                refused[disk.pair_id] = RefusedDisk(
                    pair_id=disk.pair_id, code=exc.first.code, message=exc.first.message
                )
        self._refused = refused

    def _serve(self, sock: ssl.SSLSocket, peer: str) -> None:
        reader = FrameReader(sock)
        writer = FrameWriter(sock)
        first = reader.read()
        if first is None or first.header.type != FrameType.HELLO:
            raise ProtocolError(f"{peer} did not open with HELLO")
        hello = decode_model(Hello, first.payload)
        if hello.role != Role.PROCESS_SERVER:
            raise ProtocolError(f"{peer} is not a process server")
        pairs: list[_Pair] = []
        for pair_id in hello.pairs:
            pair = self._pairs.get(pair_id)
            if pair is None:
                problem = self._refusal(pair_id)
                writer.send_model(
                    FrameType.ERROR,
                    ErrorBody(code=problem.code, message=problem.message, remediation=problem.remediation),
                )
                return
            pairs.append(pair)
        writer.send_model(
            FrameType.HELLO, HelloReply(acked={p.disk.pair_id: p.applier.applied_seq for p in pairs})
        )
        self._apply_stream(reader, writer, sock, pairs)

    def _refusal(self, pair_id: str) -> Problem:
        refused = self._refused.get(pair_id)
        if refused is not None and refused.code == "mt-disk-limit":
            return disk_limit_error(pair_id, len(self._pairs)).first
        return Problem(
            code="mt-disk-not-attached",
            message=f"Pair {pair_id!r} has no target disk attached to master target {self.name!r}.",
            remediation="Enable replication (or reprotect) so the disk is attached, then retry.",
        )

    def _apply_stream(
        self, reader: FrameReader, writer: FrameWriter, sock: ssl.SSLSocket, pairs: list[_Pair]
    ) -> None:
        touched: set[int] = set()
        pending = 0
        while True:
            try:
                frame = reader.read()
            except CorruptFrame as exc:
                writer.send(FrameType.NACK, pair=exc.pair, seq=exc.seq)
                raise
            if frame is None:
                return
            h = frame.header
            if h.pair >= len(pairs):
                raise ProtocolError(f"pair index {h.pair} outside the session's {len(pairs)} pairs")
            pair = pairs[h.pair]
            if h.type in (FrameType.WRITE, FrameType.BLOCK, FrameType.BOOKMARK):
                with pair.lock:
                    if h.seq > pair.seen:
                        if h.type == FrameType.BOOKMARK:
                            bm = decode_model(Bookmark, frame.payload)
                            pair.applier.bookmark(h.seq, bm.tag, bm.kind.name.lower(), bm.timestamp)
                        elif h.flags & Flag.ZERO:
                            pair.applier.apply_zero(h.seq, h.offset, h.length)
                        else:
                            pair.applier.apply_write(h.seq, h.offset, frame.payload)
                        pair.seen = h.seq
                        pair.last_applied_time = time.time()
                touched.add(h.pair)
                pending += len(frame.payload)
            elif h.type == FrameType.RESYNC_REQUEST:
                self._answer_resync(writer, h.pair, h.seq, pair, decode_model(ResyncRequest, frame.payload))
            elif h.type == FrameType.HEARTBEAT:
                writer.send(FrameType.HEARTBEAT)
            else:
                raise ProtocolError(f"unexpected {h.type.name} frame from a process server")
            if touched and (pending >= ACK_EVERY_BYTES or idle(sock)):
                for idx in touched:
                    p = pairs[idx]
                    with p.lock:
                        p.applier.sync()
                        seq = p.seen
                    writer.send(FrameType.ACK, pair=idx, seq=seq)
                touched.clear()
                pending = 0

    def _answer_resync(
        self, writer: FrameWriter, idx: int, seq: int, pair: _Pair, req: ResyncRequest
    ) -> None:
        with pair.lock:
            pair.applier.sync()
            if req.blocks is None or pair.hasher is None:
                pair.hasher = BlockHasher(pair.disk.path, pair.disk.size, req.coarse, req.fine)
            hasher = pair.hasher
        if req.blocks is None:
            payload = hasher.coarse_digests()
        else:
            payload = b"".join(hasher.fine_digests(i) for i in req.blocks)
        writer.send(FrameType.DIGESTS, pair=idx, seq=seq, payload=payload)

    def stats(self) -> MasterTargetStats:
        pairs = list(self._pairs.values())
        return MasterTargetStats(
            pairs=[
                MasterTargetPairStats(
                    pair_id=p.disk.pair_id,
                    applied_seq=p.applier.applied_seq,
                    last_applied_time=p.last_applied_time,
                )
                for p in pairs
            ],
            attached_disks=len(pairs),
            refused=list(self._refused.values()),
            retention_volumes=[_volume(v) for v in self.retention_volumes if v.exists()],
        )


def _volume(path: Path) -> RetentionVolume:
    usage = shutil.disk_usage(path)
    return RetentionVolume(
        path=path, capacity_bytes=usage.total, free_bytes=usage.free, fs_type=_fs_type(path)
    )


def _fs_type(path: Path) -> str:
    """File system type of the mount holding `path`, from /proc/self/mounts (longest prefix)."""
    best, fs = "", "unknown"
    real = os.path.realpath(path)
    try:
        with open("/proc/self/mounts") as f:
            for line in f:
                parts = line.split()
                inside = len(parts) >= 3 and (real == parts[1] or real.startswith(parts[1].rstrip("/") + "/"))
                if inside and len(parts[1]) > len(best):
                    best, fs = parts[1], parts[2]
    except OSError:
        return fs
    return fs
