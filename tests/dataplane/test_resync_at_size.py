"""A full sync, then a delta resync answered from the master target's kept digests, at a size where
the master target's buffers recycle (real agent, process server and master target over mTLS).

What `bench_resync` checks at 2 GiB, in `make test`: the services replicate a random disk in full
(128 MiB: several times what the master target holds in memory at once — frames read ahead,
writes pending, recycled buffers), then scattered 4 KiB blocks of the source are rewritten behind
the agent's back and the pair's generation is raised with sync mode delta, as the product does
after an outage. The master target answers the resync from the digests it kept while applying
(it reads no replica byte), so a digest that describes bytes the replica does not hold hides the
difference for good. The replica is compared with the source block by block after each phase: a
failure names the blocks and whether the resync was meant to carry them.

The wait for the resync starts from the agent taking the new generation up (`wait_generation`):
session 8's "target differs from source" in `bench_resync` was its wait ending on the crash
bookmark the agent inserts just after the full sync, before the resync began.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

from tests.dataplane.conftest import (
    Component,
    Plane,
    compare_raw,
    one_pair,
    pair_stats,
    replication,
    wait_generation,
    wait_replicated,
    write_json,
)

MiB = 1 << 20
BLOCK = 4096
SIZE = 128 * MiB
REWRITTEN = SIZE // BLOCK // 100  # 1 % of the 4 KiB blocks, as bench_resync


def _random_disk(path: Path, size: int) -> Path:
    with open(path, "wb") as f:
        for _ in range(size // (16 * MiB)):
            f.write(os.urandom(16 * MiB))
    return path


def _differing_blocks(a: Path, b: Path) -> list[int]:
    """Indexes of the 4 KiB blocks in which the two files differ (a short file reads as zeroes)."""
    out: list[int] = []
    with open(a, "rb") as fa, open(b, "rb") as fb:
        base = 0
        while chunk_a := fa.read(MiB):
            chunk_b = fb.read(MiB).ljust(len(chunk_a), b"\0")
            if chunk_a != chunk_b:
                out += [
                    (base + o) // BLOCK
                    for o in range(0, len(chunk_a), BLOCK)
                    if chunk_a[o : o + BLOCK] != chunk_b[o : o + BLOCK]
                ]
            base += len(chunk_a)
    return out


def _replica_read(mt: Component) -> int:
    for p in mt.stats().get("pairs", []):  # type: ignore[union-attr]
        if p["pair_id"] == "p1":  # type: ignore[index]
            return int(p.get("replica_bytes_read", 0))  # type: ignore[union-attr]
    raise AssertionError("no stats of p1 from the master target")


def test_delta_resync_from_kept_digests_after_a_full_sync_leaves_the_replica_equal(plane: Plane) -> None:
    src = _random_disk(plane.root / "src.img", SIZE)
    target = plane.root / "target.img"
    mt, ps, agent = one_pair(plane, src, target, SIZE)
    wait_replicated(agent, mt, "p1", timeout=300)
    wrong = _differing_blocks(src, target)
    assert not wrong, f"after the full sync {len(wrong)} blocks differ, first {wrong[:16]}"

    rng = random.Random(16)
    rewritten = sorted(rng.sample(range(SIZE // BLOCK), REWRITTEN))
    with open(src, "r+b") as f:
        for block in rewritten:
            f.seek(block * BLOCK)
            f.write(os.urandom(BLOCK))
    before = pair_stats(agent, "p1")
    ps_addr = ps.args[ps.args.index("--listen") + 1]
    mt_addr = mt.args[mt.args.index("--listen") + 1]
    spec = {**replication("p1", "d0", ps_addr, mt_addr, "delta"), "generation": 2}
    write_json(plane.root / "agent-assignments.json", {"replications": [spec]})
    wait_generation(agent, "p1", 2)
    wait_replicated(agent, mt, "p1", timeout=300)

    wrong = _differing_blocks(src, target)
    missed = sorted(set(wrong) & set(rewritten))
    assert not wrong, (
        f"after the delta resync {len(wrong)} blocks differ ({len(missed)} of them rewritten before it),"
        f" first {wrong[:16]}"
    )
    assert compare_raw(src, target) == 0
    assert _replica_read(mt) == 0, "the master target read its replica instead of using its digests"
    sent = int(pair_stats(agent, "p1")["bytes_sent"]) - int(before["bytes_sent"])  # type: ignore[call-overload]
    assert sent < REWRITTEN * BLOCK * 2, f"{sent} bytes sent for {REWRITTEN * BLOCK} changed"
