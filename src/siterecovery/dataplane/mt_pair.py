"""One attached disk of the master target: its applier, its block digests, its resync answers.

`TargetPair` holds what the master target knows of a pair between sessions: the applier (journal
or direct), the sequence seen, the session that may apply, and the replica's block digests
(`target_digests.py`), kept in step with every applied frame and persisted after each sync. A
resync request is answered from those digests; only blocks they do not know are read from the
replica. Replicas behind another applier (a page blob) have no digest store and are hashed from
the disk as before (`blocks.BlockStream`).
"""

from __future__ import annotations

import base64
import itertools
import logging
import os
import ssl
import threading
from collections.abc import Callable

from siterecovery.dataplane.apply import DirectApplier, DiskApplier
from siterecovery.dataplane.assignments import AttachedDisk, MasterTargetPairStats, PointInfo
from siterecovery.dataplane.blocks import (
    COARSE,
    DIGEST_SIZE,
    FINE,
    STREAM_WAIT,
    BlockHasher,
    BlockStream,
    answer_for,
)
from siterecovery.dataplane.healing import Gaps
from siterecovery.dataplane.journal import JournaledDisk
from siterecovery.dataplane.mt_points import point_infos, position_id
from siterecovery.dataplane.protocol import ProtocolError, ResyncRequest
from siterecovery.dataplane.target_digests import TargetDigests
from siterecovery.dataplane.trust import Peer
from siterecovery.errors import SiteRecoveryError

log = logging.getLogger(__name__)

MAX_PREFETCH = 1 << 17  # numbers in one prefetch hint (a region's ranges: 16 MiB of 4 KiB runs)


def durable_seq(applier: DiskApplier) -> int:
    """What the applier holds durably (the journal's applied sequence may be ahead of its commit)."""
    return applier.committed_seq if isinstance(applier, JournaledDisk) else applier.applied_seq


class TargetPair:
    def __init__(
        self,
        disk: AttachedDisk,
        applier: DiskApplier,
        gaps: Gaps | None = None,
        digests: TargetDigests | None = None,
    ) -> None:
        self.disk = disk
        self.applier = applier
        self.gaps = gaps or Gaps(None)  # writes refused upstream and awaited again (healing.py)
        self.digests = digests
        self.lock = threading.Lock()
        self.seen = applier.applied_seq
        self.synced_seq = applier.applied_seq  # applied_seq at the last sync
        self.last_applied_time: float | None = None
        self.hasher: BlockHasher | None = None
        self.session = 0  # the newest process-server session; older ones stop applying
        self.detached = False
        self.paused = ""
        self.position = position_id(applier) if isinstance(applier, JournaledDisk) else "latest"
        self.last_ack = -1
        self.link: tuple[Peer, ssl.SSLSocket] | None = None  # the session that applies it

    @staticmethod
    def keeps_digests(applier: DiskApplier) -> bool:
        """Digests are kept for replicas written in place as local files (not page blobs)."""
        return isinstance(applier, (JournaledDisk, DirectApplier))

    def stats(self, now: float) -> MasterTargetPairStats:
        applier = self.applier
        points: list[PointInfo] = []
        journal_bytes = 0
        with self.lock:
            if isinstance(applier, JournaledDisk) and not self.detached:
                points, journal_bytes = self.gaps.mark(point_infos(applier, now)), applier.journal_bytes
            missing = sorted(self.gaps.missing)  # changed under the lock by the applying session
        read = self.digests.counters.replica_bytes_read if self.digests is not None else 0
        read += self.hasher.bytes_read if self.hasher is not None else 0
        return MasterTargetPairStats(
            pair_id=self.disk.pair_id,
            applied_seq=durable_seq(applier),
            last_applied_time=self.last_applied_time,
            points=points,
            position=self.position,
            journal_bytes=journal_bytes,
            paused=self.paused,
            missing=missing,
            replica_bytes_read=read,
        )

    # ---- under the lock ----------------------------------------------------------------------

    def sync(self) -> None:
        """The applier's sync, then the digests of what it made durable."""
        try:
            self.applier.sync()
        except SiteRecoveryError:
            if self.digests is not None:
                self.digests.forget_unflushed()  # the journal may have undone the batch
            raise
        self.synced_seq = self.applier.applied_seq
        if self.digests is not None:
            self.digests.flush()

    def close(self) -> None:
        if self.digests is not None:
            self.digests.close()
        self.applier.close()

    def prefetch(self, flat: list[int]) -> None:
        """Have the kernel read the ranges a resync is about to overwrite (offset, length pairs):
        the journal reads each one's bytes for its undo record, and one at a time from a cold
        disk that read was most of a resync's time on the master target."""
        if len(flat) % 2 or len(flat) > MAX_PREFETCH:
            raise ProtocolError(f"prefetch hint of {len(flat)} numbers for pair {self.disk.pair_id!r}")
        if not isinstance(self.applier, JournaledDisk) or self.detached:
            return  # nothing is read before it is overwritten
        fd = os.open(self.disk.path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            for offset, length in zip(flat[0::2], flat[1::2], strict=True):
                if 0 <= offset < self.disk.size and length > 0:
                    os.posix_fadvise(fd, offset, min(length, self.disk.size - offset), os.POSIX_FADV_WILLNEED)
        finally:
            os.close(fd)

    def answer(self, req: ResyncRequest, sync: Callable[[], None]) -> bytes:
        """Digests of the replica for a resync request (see `ResyncRequest`); `sync` is the master
        target's sync of this pair (pausing on a full volume), called under the lock."""
        blocks = req.blocks or []
        store = self.digests
        if req.have is not None and store is not None and (req.coarse, req.fine) == (COARSE, FINE):
            with self.lock:
                if self.detached:
                    raise ProtocolError(f"pair {self.disk.pair_id!r} was detached")
                if store.unknown(blocks) and self.applier.applied_seq != self.synced_seq:
                    sync()  # blocks read from the replica must hold everything applied
                return answer_from(store, blocks, req.have)
        return self._answer_hashing(req, blocks, sync)

    def _answer_hashing(self, req: ResyncRequest, blocks: list[int], sync: Callable[[], None]) -> bytes:
        """Without a digest store: hash the replica (in the background, ahead of the requests).

        A request with `have` continues the pair's `BlockStream` or, for a new or resumed resync,
        starts one. Only a new stream needs what was applied flushed to the disk first: the blocks
        applied meanwhile lie in regions the stream has already hashed.
        """
        with self.lock:
            old = self.hasher
            if req.have is not None:
                if not (isinstance(old, BlockStream) and old.alive and blocks and blocks[0] >= old.position):
                    sync()
                    self.hasher = BlockStream(
                        self.disk.path, self.disk.size, req.coarse, req.fine, first=blocks[0] if blocks else 0
                    )
            else:
                sync()
                if req.blocks is None or old is None:
                    self.hasher = BlockHasher(self.disk.path, self.disk.size, req.coarse, req.fine)
            hasher = self.hasher
            if isinstance(old, BlockStream) and old is not hasher:
                old.close()
        assert hasher is not None
        if req.have is not None and isinstance(hasher, BlockStream):
            try:
                return answer_for(hasher, blocks, req.have, STREAM_WAIT)
            except ValueError as exc:
                raise ProtocolError(f"resync request for pair {self.disk.pair_id!r}: {exc}") from exc
        if req.blocks is None:
            return hasher.coarse_digests()
        return b"".join(hasher.fine_digests(i) for i in req.blocks)


def answer_from(store: TargetDigests, blocks: list[int], have_b64: str) -> bytes:
    """As `blocks.answer_for`, from the digest store instead of a hashing stream."""
    try:
        have = base64.b64decode(have_b64, validate=True)
    except ValueError as exc:
        raise ProtocolError(f"resync request: {exc}") from exc
    if len(have) != DIGEST_SIZE * len(blocks) or any(b <= a for a, b in itertools.pairwise(blocks)):
        raise ProtocolError("resync request: coarse digests must match ascending block indexes one to one")
    if blocks and not 0 <= blocks[0] <= blocks[-1] < store.nblocks:
        raise ProtocolError(f"resync request: blocks outside the disk's {store.nblocks}")
    out = bytearray()
    for j, idx in enumerate(blocks):
        coarse_digest, fines = store.digests(idx)
        out += coarse_digest
        if coarse_digest != have[j * DIGEST_SIZE : (j + 1) * DIGEST_SIZE]:
            out += fines
    return bytes(out)
