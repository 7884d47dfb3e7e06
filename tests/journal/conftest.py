"""Fixtures for the journal tests: an injectable clock and journaled disks that are always closed."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from siterecovery.dataplane.journal import JournaledDisk

DISK = 16 << 20


class Clock:
    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> Clock:
    return Clock()


OpenDisk = Callable[..., JournaledDisk]


@pytest.fixture
def open_disk(tmp_path: Path, clock: Clock) -> Iterator[OpenDisk]:
    """Open (or reopen) the test's journaled disk: tmp_path/disk.img with tmp_path/journal."""
    opened: list[JournaledDisk] = []

    def make(name: str = "disk", **kw: Any) -> JournaledDisk:
        kw.setdefault("retention_seconds", 3600.0)
        kw.setdefault("size", DISK)
        kw.setdefault("clock", clock)
        disk = JournaledDisk(tmp_path / f"{name}.img", tmp_path / f"{name}-journal", name=name, **kw)
        opened.append(disk)
        return disk

    yield make
    for d in opened:
        d.close()
