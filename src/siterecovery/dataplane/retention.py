"""Retention volumes of a master target (RP-RET): discovery, eligibility and the default choice.

A master target keeps each disk's journal on a retention volume. Discovery describes every
candidate (a mount point or a directory acting as one): its file system type (from /proc/mounts,
or an explicit override), capacity (statvfs, or an override), whether it is locked (a lock file in
its root, or an override), whether a replication target disk or a process-server cache /
master-target installation directory lives on it. A path lives on the candidate whose root is its
longest prefix among all mount points and candidates, so nested mounts and plain test directories
are both told apart correctly. Only eligible volumes are offered; choosing another one by name
fails `retention-volume-ineligible` with the criterion that failed.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from siterecovery.errors import Problem, SiteRecoveryError, Status, not_found

LOCK_FILE = ".siterecovery-locked"
_FAT_TYPES = frozenset({"vfat", "msdos", "fat", "fat32", "fat16", "umsdos"})


class Criterion(StrEnum):
    """An RP-RET criterion a volume can fail, in the order they are checked."""

    REPLICATION_TARGET = "replication-target"
    LOCKED = "locked"
    CACHE_VOLUME = "cache-volume"
    FAT32 = "fat32"
    ZERO_CAPACITY = "zero-capacity"


_WHY = {
    Criterion.REPLICATION_TARGET: (
        "a replicated disk's target image lives on it",
        "Choose a volume that holds no replication target disks, or move the target disks elsewhere.",
    ),
    Criterion.LOCKED: (
        "it is locked",
        f"Unlock the volume (remove {LOCK_FILE} from its root) or choose another volume.",
    ),
    Criterion.CACHE_VOLUME: (
        "it holds the process server's cache or the master target's installation",
        "Choose a volume separate from the cache and installation directories.",
    ),
    Criterion.FAT32: (
        "its file system is FAT/FAT32",
        "Format the volume with ext4, XFS or NTFS, or choose another volume.",
    ),
    Criterion.ZERO_CAPACITY: (
        "its capacity is zero",
        "Attach or extend the volume so it has capacity, or choose another volume.",
    ),
}


@dataclass(frozen=True)
class VolumeSpec:
    """A candidate volume; the optional fields override what the machine reports (lab and tests)."""

    path: Path
    name: str | None = None
    fs_type: str | None = None
    capacity_bytes: int | None = None
    locked: bool | None = None


@dataclass(frozen=True)
class Mount:
    mount_point: Path
    fs_type: str


@dataclass(frozen=True)
class RetentionVolume:
    name: str
    path: Path
    fs_type: str
    capacity_bytes: int
    free_bytes: int
    locked: bool
    replication_target: bool
    cache_or_install: bool

    @property
    def failed(self) -> tuple[Criterion, ...]:
        checks = (
            (Criterion.REPLICATION_TARGET, self.replication_target),
            (Criterion.LOCKED, self.locked),
            (Criterion.CACHE_VOLUME, self.cache_or_install),
            (Criterion.FAT32, self.fs_type.lower() in _FAT_TYPES),
            (Criterion.ZERO_CAPACITY, self.capacity_bytes <= 0),
        )
        return tuple(c for c, bad in checks if bad)

    @property
    def eligible(self) -> bool:
        return not self.failed

    @property
    def reason(self) -> str:
        """Why the volume is not eligible ("" if it is): the first failed criterion, explained."""
        if not self.failed:
            return ""
        first = self.failed[0]
        return f"{first.value}: {_WHY[first][0]}"


def read_mounts(path: Path = Path("/proc/mounts")) -> list[Mount]:
    out: list[Mount] = []
    for line in path.read_text().splitlines():
        parts = line.split()
        if len(parts) >= 3:
            # /proc/mounts escapes spaces and tabs in mount points as octal.
            point = parts[1].replace("\\040", " ").replace("\\011", "\t")
            out.append(Mount(Path(point), parts[2]))
    return out


def _owner(path: Path, roots: Iterable[Path]) -> Path | None:
    """The root among `roots` that is the longest prefix of `path`."""
    best: Path | None = None
    for root in roots:
        if path.is_relative_to(root) and (best is None or len(root.parts) > len(best.parts)):
            best = root
    return best


def discover_volumes(
    candidates: Sequence[Path | VolumeSpec],
    *,
    target_disks: Sequence[Path] = (),
    cache_dirs: Sequence[Path] = (),
    mounts: Sequence[Mount] | None = None,
) -> list[RetentionVolume]:
    """Describe every candidate; `cache_dirs` are the PS cache and MT installation directories."""
    mount_list = list(mounts) if mounts is not None else read_mounts()
    specs = [c if isinstance(c, VolumeSpec) else VolumeSpec(c) for c in candidates]
    roots = [s.path.resolve() for s in specs]
    all_roots = roots + [m.mount_point for m in mount_list]
    targets = {_owner(p.resolve(), all_roots) for p in target_disks}
    caches = {_owner(p.resolve(), all_roots) for p in cache_dirs}
    out: list[RetentionVolume] = []
    for spec, root in zip(specs, roots, strict=True):
        fs_type = spec.fs_type
        if fs_type is None:
            owning = _owner(root, [m.mount_point for m in mount_list])
            fs_type = next((m.fs_type for m in reversed(mount_list) if m.mount_point == owning), "unknown")
        capacity, free = spec.capacity_bytes, 0
        if root.exists():
            st = os.statvfs(root)
            free = st.f_bavail * st.f_frsize
            if capacity is None:
                capacity = st.f_blocks * st.f_frsize
        locked = spec.locked if spec.locked is not None else (root / LOCK_FILE).exists()
        out.append(
            RetentionVolume(
                name=spec.name or str(spec.path),
                path=root,
                fs_type=fs_type,
                capacity_bytes=capacity or 0,
                free_bytes=min(free, capacity or 0),
                locked=locked,
                replication_target=root in targets,
                cache_or_install=root in caches,
            )
        )
    return out


def eligible_volumes(volumes: Sequence[RetentionVolume]) -> list[RetentionVolume]:
    """The volumes a user may be offered (ineligible ones are not shown)."""
    return [v for v in volumes if v.eligible]


def check_retention_volume(name: str, volumes: Sequence[RetentionVolume]) -> RetentionVolume:
    """The volume called `name` if it is eligible; otherwise the first RP-RET criterion it fails."""
    found = next((v for v in volumes if name in (v.name, str(v.path))), None)
    if found is None:
        raise not_found("retention volume", name)
    if found.eligible:
        return found
    first = found.failed[0]
    why, remediation = _WHY[first]
    raise SiteRecoveryError(
        Problem(
            code="retention-volume-ineligible",
            message=f"Retention volume {name!r} is not eligible: {why} ({first.value}).",
            remediation=remediation,
            rule="RP-RET",
            detail={"volume": name, "criterion": first.value, "failed": [c.value for c in found.failed]},
        ),
        Status.CONFLICT,
    )
