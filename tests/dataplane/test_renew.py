"""A raised generation with no sync pending is taken up by the running sender (`renew_idle`).

The agent keeps the sender child then (`Agent._respec`): it reads the new sync from the pair's
state. With a sync pending it must not: the child would report the old sync's last frame as the
new one's, ending the new sync early, so `renew_idle` leaves the pair alone and the agent restarts
the sender as for any other change.
"""

from __future__ import annotations

from pathlib import Path

from siterecovery.dataplane.assignments import DiskReplication, SyncMode
from siterecovery.dataplane.replica import PairReplication, SyncKind

MiB = 1 << 20


def _spec(generation: int, mode: SyncMode) -> DiskReplication:
    return DiskReplication(
        pair_id="p1",
        disk="d0",
        process_server="127.0.0.1:1",
        master_target="127.0.0.1:2",
        sync_mode=mode,
        generation=generation,
    )


def test_a_raised_generation_is_renewed_in_place_only_when_no_sync_is_pending(tmp_path: Path) -> None:
    image = tmp_path / "d0.img"
    image.write_bytes(bytes(MiB))
    pair = PairReplication(_spec(1, SyncMode.FULL), image, tmp_path / "state")
    initial = pair.sync
    assert initial is not None and initial.kind == SyncKind.FULL
    assert not pair.renew_idle(_spec(2, SyncMode.DELTA)), "renewed over the pending initial sync"
    assert pair.sync is initial and pair.spec.generation == 1
    pair.sync_generated(None)  # the initial sync sent nothing and is complete
    assert pair.sync is None
    seen = pair.tail.state_generation
    assert pair.renew_idle(_spec(2, SyncMode.DELTA))
    assert pair.sync is not None and pair.sync.kind == SyncKind.DELTA
    assert pair.spec.generation == 2
    assert pair.tail.state_generation > seen, "the running sender would not see the new sync"
