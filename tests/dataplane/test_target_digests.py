"""The master target's block digests of a replica (`target_digests.py`): kept on apply, persisted,
never trusted where the replica may differ from them (a crash mid-apply, a change from outside).

The truth is always the replica itself, hashed by `BlockHasher` as a resync without the store
would hash it; the store must give the same digests for every block, whatever happened."""

from __future__ import annotations

import base64
import os
from pathlib import Path

from siterecovery.dataplane.apply import DirectApplier
from siterecovery.dataplane.blocks import COARSE, BlockHasher, BlockStream, answer_for
from siterecovery.dataplane.mt_pair import answer_from
from siterecovery.dataplane.target_digests import EXTENT_BLOCKS, BlockState, TargetDigests

MiB = 1 << 20
SIZE = 3 * EXTENT_BLOCKS * MiB + 3 * MiB + 8192  # three extents and a bit, a short last block


def truth(path: Path) -> list[tuple[bytes, bytes]]:
    hasher = BlockHasher(path, SIZE)
    coarse = hasher.coarse_digests()
    return [(coarse[i * 16 : (i + 1) * 16], hasher.fine_digests(i)) for i in range(hasher.nblocks)]


def check(store: TargetDigests, path: Path) -> None:
    for idx, want in enumerate(truth(path)):
        assert store.digests(idx) == want, f"block {idx} ({BlockState(store.state[idx]).name})"


class Replica:
    """A direct applier and its digest store, applied to as the master target does."""

    def __init__(self, root: Path) -> None:
        self.path = root / "replica.img"
        self.state = root / "state"
        self.applier = DirectApplier("p", self.path, SIZE, self.state)
        self.store = TargetDigests(self.state / "digests", self.path, SIZE)
        self.seq = 0

    def write(self, offset: int, data: bytes) -> None:
        self.seq += 1
        self.store.before_write(offset, len(data))
        self.applier.apply_write(self.seq, offset, memoryview(data))
        self.store.wrote(offset, memoryview(data))

    def zero(self, offset: int, length: int) -> None:
        self.seq += 1
        self.store.before_write(offset, length)
        self.applier.apply_zero(self.seq, offset, length)
        self.store.zeroed(offset, length)

    def sync(self) -> None:
        self.applier.sync()
        self.store.flush()

    def reopen(self) -> TargetDigests:
        return TargetDigests(self.state / "digests", self.path, SIZE)


def test_digests_are_kept_on_apply_and_survive_a_clean_close(tmp_path: Path) -> None:
    r = Replica(tmp_path)
    r.write(0, os.urandom(COARSE))  # a whole block
    r.write(5 * MiB + 4096, os.urandom(3 * 4096))  # fine blocks inside a block
    r.write(EXTENT_BLOCKS * MiB - 4096, os.urandom(8192))  # across blocks and extents
    r.write(SIZE - 8192, os.urandom(8192))  # the short last block
    r.zero(0, 4096)
    r.zero(2 * EXTENT_BLOCKS * MiB, 2 * MiB)
    r.sync()
    check(r.store, r.path)
    assert r.store.counters.replica_bytes_read == 0, "the replica was read for known blocks"
    r.store.close()
    r.applier.close()
    again = Replica(tmp_path).store
    check(again, again.target)
    assert again.counters.replica_bytes_read == 0, "digests were not persisted"


def test_blocks_written_again_after_a_flush_keep_true_digests(tmp_path: Path) -> None:
    """Digests kept in memory after a flush (not read back) and written in runs stay the truth."""
    r = Replica(tmp_path)
    r.write(0, os.urandom(4 * COARSE))  # blocks 0-3: one run of four
    r.write(9 * MiB, os.urandom(4096))
    r.sync()
    for offset in (4096, COARSE + 8192, 3 * COARSE, 9 * MiB + 4096, 2 * COARSE):
        r.write(offset, os.urandom(4096))
    r.zero(COARSE, 4096)
    r.sync()
    check(r.store, r.path)
    r.write(COARSE + 4096, os.urandom(4096))  # a zeroed fine block of a block in memory
    r.sync()
    check(r.store, r.path)
    r.store.close()
    r.applier.close()
    again = Replica(tmp_path).store
    check(again, again.target)
    assert again.counters.replica_bytes_read == 0


def test_a_crash_before_the_flush_leaves_the_written_extents_unknown(tmp_path: Path) -> None:
    r = Replica(tmp_path)
    r.write(0, os.urandom(4 * COARSE))
    r.write(EXTENT_BLOCKS * MiB, os.urandom(COARSE))
    r.sync()
    # The flush has not cooled these extents yet, and the next writes land after the last flush.
    r.write(2 * MiB, os.urandom(4096))
    r.write(2 * EXTENT_BLOCKS * MiB + 8192, os.urandom(4096))
    r.applier.sync()
    # Crash: no flush, no close. A journal's recovery may then rewrite what was being written
    # (here: bytes the store never saw) — stale digests must not describe them.
    with open(r.path, "r+b") as f:
        f.seek(2 * MiB)
        f.write(os.urandom(4096))
        f.seek(2 * EXTENT_BLOCKS * MiB)
        f.write(os.urandom(8192))
    after = r.reopen()
    for extent in (0, 2):
        block = extent * EXTENT_BLOCKS
        assert after.state[block] == BlockState.UNKNOWN, f"extent {extent} trusted after a crash"
    check(after, r.path)
    assert after.counters.replica_bytes_read > 0


def test_a_replica_changed_while_closed_is_not_trusted(tmp_path: Path) -> None:
    r = Replica(tmp_path)
    r.write(0, os.urandom(2 * COARSE))
    r.sync()
    r.store.close()
    r.applier.close()
    with open(r.path, "r+b") as f:  # e.g. a recovery machine booted from the replica
        f.seek(COARSE + 4096)
        f.write(os.urandom(4096))
    after = r.reopen()
    assert not any(after.state), "digests trusted for a replica changed outside"
    check(after, r.path)


def test_writes_not_aligned_to_fine_blocks_are_read_back(tmp_path: Path) -> None:
    r = Replica(tmp_path)
    r.write(0, os.urandom(COARSE))
    r.write(512, os.urandom(1024))  # part of a fine block
    r.sync()
    assert r.store.state[0] == BlockState.UNKNOWN
    check(r.store, r.path)
    assert r.store.state[0] == BlockState.DATA, "the block read back was not remembered"
    read = r.store.counters.replica_bytes_read
    check(r.store, r.path)
    assert r.store.counters.replica_bytes_read == read


def test_forget_distrusts_everything_durably(tmp_path: Path) -> None:
    r = Replica(tmp_path)
    r.write(0, os.urandom(COARSE))
    r.sync()
    r.store.forget()  # the replica is about to move to a recovery point
    with open(r.path, "r+b") as f:
        f.write(os.urandom(4096))
    assert not any(r.reopen().state)
    check(r.store, r.path)


def test_answers_from_the_store_equal_answers_from_hashing_the_replica(tmp_path: Path) -> None:
    """The master target's two ways to answer a resync region give the same bytes on the wire."""
    r = Replica(tmp_path)
    r.write(0, os.urandom(3 * COARSE))
    r.write(6 * MiB + 4096, os.urandom(4096))
    r.zero(COARSE, 8192)
    r.sync()
    blocks = list(range(8))
    mine = BlockHasher(r.path, SIZE).coarse_digests()[: 8 * 16]  # as if the source were the same...
    have = bytearray(mine)
    have[16:32] = bytes(16)  # ...but for block 1, whose fine digests must then be answered
    stream = BlockStream(r.path, SIZE)
    try:
        expected = answer_for(stream, blocks, base64.b64encode(have).decode(), 60)
    finally:
        stream.close()
    assert answer_from(r.store, blocks, base64.b64encode(have).decode()) == expected
    assert r.store.counters.replica_bytes_read == 0
