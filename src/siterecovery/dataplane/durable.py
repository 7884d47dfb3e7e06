"""Crash-safe replacement of the agent's small state files (pair state, pair list, bitmaps).

A state file is replaced whole: the new content goes to a temporary file that is fsynced, renamed
over the old one, and the directory is fsynced so the rename itself survives a power loss. After a
crash a reader finds either the old content or the new one, never a mixture or nothing.
"""

from __future__ import annotations

import os
from pathlib import Path


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durably(path: Path, data: bytes | bytearray) -> None:
    """Replace `path` with `data` atomically and durably (tmp + fsync + rename + fsync dir)."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    fsync_dir(path.parent)
