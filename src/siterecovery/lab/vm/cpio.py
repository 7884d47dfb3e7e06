"""A minimal writer of the `newc` cpio archives the Linux kernel unpacks as its initramfs.

Written here rather than by the `cpio` tool so that device nodes (`/dev/console`) can be put into
the archive without root privileges: an archive entry is only a header, no `mknod` is needed.
"""

from __future__ import annotations

import stat
from dataclasses import dataclass, field
from typing import BinaryIO

_TRAILER = "TRAILER!!!"


@dataclass
class CpioWriter:
    out: BinaryIO
    _ino: int = 1
    _names: set[str] = field(default_factory=set)

    def _entry(self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)) -> None:
        encoded = name.encode() + b"\0"
        fields = (
            self._ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(encoded), 0,
        )  # fmt: skip
        header = b"070701" + b"".join(f"{v:08x}".encode() for v in fields)
        self._ino += 1
        self.out.write(header + encoded)
        self.out.write(b"\0" * (-(len(header) + len(encoded)) % 4))
        self.out.write(data)
        self.out.write(b"\0" * (-len(data) % 4))

    def _new(self, name: str) -> bool:
        name = name.strip("/")
        if name in self._names:
            return False
        self._names.add(name)
        return True

    def directory(self, name: str) -> None:
        parent = name.strip("/").rpartition("/")[0]
        if parent:
            self.directory(parent)
        if self._new(name):
            self._entry(name.strip("/"), stat.S_IFDIR | 0o755)

    def file(self, name: str, data: bytes, mode: int = 0o755) -> None:
        parent = name.strip("/").rpartition("/")[0]
        if parent:
            self.directory(parent)
        if self._new(name):
            self._entry(name.strip("/"), stat.S_IFREG | mode, data)

    def symlink(self, name: str, target: str) -> None:
        if self._new(name):
            self._entry(name.strip("/"), stat.S_IFLNK | 0o777, target.encode())

    def char_device(self, name: str, major: int, minor: int, mode: int = 0o600) -> None:
        if self._new(name):
            self._entry(name.strip("/"), stat.S_IFCHR | mode, rdev=(major, minor))

    def close(self) -> None:
        self._entry(_TRAILER, 0)
