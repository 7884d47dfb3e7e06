"""The master target's retention journal: a target disk at the newest state plus undo history.

`JournaledDisk` implements the `DiskApplier` seam (see `apply.py`). The target image always holds
the newest applied state; for every write the journal keeps what it replaced (an undo record) in
append-only segment files on the retention volume, for the retention window. Recovery points are
records in the same stream, so they vanish with the history they need. Materialising a point
rolls the disk back in place (saving what it overwrites as redo, so the operator may change the
point before committing) or into a sparse copy; "latest" costs nothing.

Durability is write-ahead: an undo record is fsynced before the disk bytes it protects are
overwritten, and `sync()` ends with a fsynced commit record naming the applied sequence. On open,
records after the last commit are rolled back onto the disk and cut off, which returns the disk to
exactly the acknowledged state; the sender then resends what was never acknowledged. The on-disk
format and the argument are in docs/journal.md. One instance is driven by one task at a time.

The package: `format` (records and headers), `ranges` (in-memory range sets), `log` (appending,
committing, recovery on open, segments), `moves` (rolling between points, copies) and `disk`
(`JournaledDisk` and its factory).
"""

from siterecovery.dataplane.journal.disk import JournaledDisk, journaled_applier_factory
from siterecovery.dataplane.journal.format import CopyMethod, MaterialiseResult

__all__ = ["CopyMethod", "JournaledDisk", "MaterialiseResult", "journaled_applier_factory"]
