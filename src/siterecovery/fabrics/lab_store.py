"""Durable, concurrency-safe storage of a lab's `inventory.json`.

Several processes use one lab at once (the CLI, the configuration server, tests, machine
runtimes), so every read-modify-write holds an exclusive `fcntl` lock on `inventory.lock`, and
every write goes to a temporary file that is fsynced, renamed over the inventory and followed by
an fsync of the folder. A reader therefore sees either the old or the new file, never half of one,
even if a writer is killed mid-write or the machine loses power.
"""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from siterecovery.dataplane.fileio import write_durably
from siterecovery.fabrics.base import FabricError
from siterecovery.fabrics.lab_model import LabState

INVENTORY = "inventory.json"
LOCK = "inventory.lock"


def write_atomically(path: Path, data: bytes) -> None:
    """Replace `path` with `data` so that a crash leaves either the old or the new content.

    The temporary file is hidden and per process: a writer killed mid-write leaves only its own.
    """
    write_durably(path, data, mode=0o644, tmp=path.with_name(f".{path.name}.{os.getpid()}.tmp"))


class LabStore:
    """The inventory of one lab folder."""

    def __init__(self, lab_dir: Path) -> None:
        self.lab_dir = Path(lab_dir).resolve()
        self.path = self.lab_dir / INVENTORY

    def exists(self) -> bool:
        return self.path.exists()

    @contextmanager
    def _locked(self, exclusive: bool) -> Iterator[None]:
        if not self.lab_dir.is_dir():
            raise FabricError(
                "lab-not-found",
                f"Lab folder {self.lab_dir} does not exist.",
                "Create it with `siterecovery lab create DIR`.",
            )
        fd = os.open(self.lab_dir / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            yield
        finally:
            os.close(fd)  # closing releases the lock

    def _load(self) -> LabState:
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            raise FabricError(
                "lab-not-found",
                f"{self.lab_dir} is not a lab (no {INVENTORY}).",
                "Create it with `siterecovery lab create DIR`.",
            ) from None
        return LabState.model_validate_json(raw)

    def _save(self, state: LabState) -> None:
        state.updated_at = time.time()
        write_atomically(self.path, state.model_dump_json(indent=2).encode())

    def read(self) -> LabState:
        with self._locked(exclusive=False):
            return self._load()

    def create(self, state: LabState) -> None:
        with self._locked(exclusive=True):
            self._save(state)

    @contextmanager
    def edit(self) -> Iterator[LabState]:
        """Read, let the caller change, and write back, all under one exclusive lock.

        If the body raises, nothing is written.
        """
        with self._locked(exclusive=True):
            state = self._load()
            yield state
            self._save(state)
