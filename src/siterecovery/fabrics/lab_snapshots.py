"""Real snapshots of lab machines: each one keeps a before-image log per disk.

A lab disk is only ever written through its machine's NBD export, so that is where the lab's
"hypervisor" keeps a snapshot: the export copies a chunk's old contents into the disk's
before-image log the first time the chunk is overwritten (`dataplane/before_image.py`), and a
revert writes them back. The export looks for the log when it starts, so a snapshot is taken while
the machine is off and the lab keeps one such snapshot per machine (a vCenter keeps a tree; the
DR workflows need one). Snapshots declared with `lab set ... snapshot=` only exist in the inventory
(they make RP-VM-SNAP true) and cannot be reverted.
"""

from __future__ import annotations

from pathlib import Path

from siterecovery.dataplane import before_image
from siterecovery.fabrics.base import FabricError, PowerState, Snapshot
from siterecovery.fabrics.lab_model import LabMachine, LabSnapshot


def _disks(lab_dir: Path, m: LabMachine) -> list[Path]:
    return [lab_dir / d.backing for d in m.disks]


def _require_off(m: LabMachine, doing: str) -> None:
    if m.power_state is PowerState.ON:
        raise FabricError(
            "machine-powered-on",
            f"Machine {m.name} is powered on; the lab can {doing} only while it is off.",
            f"Power {m.name} off first.",
        )


def _find(m: LabMachine, snapshot_id: str) -> LabSnapshot:
    found = next((s for s in m.snapshots if s.id == snapshot_id), None)
    if found is None:
        raise FabricError(
            "snapshot-not-found",
            f"Machine {m.name} has no snapshot {snapshot_id!r}.",
            "Rediscover the machine's snapshots and use a listed id.",
        )
    return found


def create(lab_dir: Path, m: LabMachine, snapshot_id: str, name: str) -> Snapshot:
    _require_off(m, "take a snapshot")
    if any(s.preserving for s in m.snapshots):
        raise FabricError(
            "lab-snapshot-limit",
            f"Machine {m.name} already has a snapshot that keeps its disks' old contents.",
            "Revert to or remove that snapshot first (the lab keeps one per machine).",
        )
    for disk in _disks(lab_dir, m):
        before_image.create(disk)
    m.snapshots.append(LabSnapshot(id=snapshot_id, name=name, preserving=True))
    return Snapshot(snapshot_id, name)


def revert(lab_dir: Path, m: LabMachine, snapshot_id: str) -> int:
    """Write the saved old contents back; returns the bytes restored."""
    snap = _find(m, snapshot_id)
    _require_off(m, "revert to a snapshot")
    if not snap.preserving:
        raise FabricError(
            "lab-snapshot-not-revertible",
            f"Snapshot {snap.name} of {m.name} was declared with `lab set` and holds no disk contents.",
            "Revert only to snapshots taken through the fabric (create_snapshot).",
        )
    return sum(before_image.restore(disk) for disk in _disks(lab_dir, m))


def remove(lab_dir: Path, m: LabMachine, snapshot_id: str) -> None:
    """Keep the current contents; the running export notices the log is gone and stops copying."""
    snap = _find(m, snapshot_id)
    if snap.preserving:
        for disk in _disks(lab_dir, m):
            before_image.discard(disk)
    m.snapshots.remove(snap)


def remove_all(lab_dir: Path, m: LabMachine) -> int:
    count = len(m.snapshots)
    for snap in list(m.snapshots):
        remove(lab_dir, m, snap.id)
    return count
