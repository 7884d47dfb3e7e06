"""RP-RET: which volumes of a master target may hold retention journals."""

from __future__ import annotations

from pathlib import Path

import pytest

from siterecovery.dataplane.retention import (
    LOCK_FILE,
    Criterion,
    Mount,
    RetentionVolume,
    VolumeSpec,
    check_retention_volume,
    discover_volumes,
    eligible_volumes,
    read_mounts,
)
from siterecovery.dr.checks import DEFAULT_RETENTION_VOLUME
from siterecovery.errors import SiteRecoveryError
from siterecovery.fabrics.base import OsType


def _volumes(tmp_path: Path, case: str) -> list[RetentionVolume]:
    """Four candidate volumes on this machine; `case` makes the one called 'ret' fail one criterion."""
    roots = {n: tmp_path / n for n in ("ret", "targets", "cache", "spare")}
    for p in roots.values():
        p.mkdir()
    targets = [roots["targets"] / "vm1-disk0.img"]
    caches = [roots["cache"] / "ps-cache", roots["cache"] / "mt-install"]
    specs = {n: VolumeSpec(p, name=n, fs_type="ext4") for n, p in roots.items()}
    if case == "replication-target":
        targets.append(roots["ret"] / "vm2-disk1.img")
    elif case == "locked":
        (roots["ret"] / LOCK_FILE).touch()
    elif case == "cache-volume":
        caches.append(roots["ret"] / "ps-cache")
    elif case == "fat32":
        specs["ret"] = VolumeSpec(roots["ret"], name="ret", fs_type="vfat")
    elif case == "zero-capacity":
        specs["ret"] = VolumeSpec(roots["ret"], name="ret", fs_type="ext4", capacity_bytes=0)
    return discover_volumes(list(specs.values()), target_disks=targets, cache_dirs=caches)


@pytest.mark.parametrize(
    "case",
    [
        pytest.param("replication-target", id="replication-target"),
        pytest.param("locked", id="locked"),
        pytest.param("cache-volume", id="cache-volume"),
        pytest.param("fat32", id="fat32"),
        pytest.param("zero-capacity", id="zero-capacity"),
    ],
)
def test_ineligible_retention_volume_is_refused_with_its_criterion(case: str, tmp_path: Path) -> None:
    volumes = _volumes(tmp_path, case)
    assert "ret" not in [v.name for v in eligible_volumes(volumes)]
    with pytest.raises(SiteRecoveryError) as refused:
        check_retention_volume("ret", volumes)
    problem = refused.value.first
    assert problem.code == "retention-volume-ineligible"
    assert problem.rule == "RP-RET"
    assert problem.detail["criterion"] == case
    assert case in problem.message and "'ret'" in problem.message
    assert problem.remediation


def test_eligible_retention_volume_is_offered_and_accepted(tmp_path: Path) -> None:
    volumes = _volumes(tmp_path, "eligible")
    by_name = {v.name: v for v in volumes}
    assert by_name["targets"].failed == (Criterion.REPLICATION_TARGET,)
    assert by_name["cache"].failed == (Criterion.CACHE_VOLUME,)
    assert [v.name for v in eligible_volumes(volumes)] == ["ret", "spare"]
    chosen = check_retention_volume("ret", volumes)
    assert chosen.capacity_bytes > 0 and chosen.fs_type == "ext4"


def test_unknown_retention_volume_is_not_found(tmp_path: Path) -> None:
    with pytest.raises(SiteRecoveryError) as missing:
        check_retention_volume("Q:", _volumes(tmp_path, "eligible"))
    assert missing.value.first.code == "not-found"


def test_file_system_type_comes_from_the_mount_table(tmp_path: Path) -> None:
    usb = tmp_path / "usb"
    usb.mkdir()
    mounts = [*read_mounts(), Mount(usb, "vfat")]
    (vol,) = discover_volumes([usb], mounts=mounts)
    assert vol.fs_type == "vfat" and vol.failed == (Criterion.FAT32,)
    (root,) = discover_volumes([Path("/")])
    assert root.fs_type == next(m.fs_type for m in read_mounts() if m.mount_point == Path("/"))


@pytest.mark.parametrize(
    ("os_type", "expected"),
    [
        pytest.param(OsType.LINUX, "/mnt/retention", id="linux"),
        pytest.param(OsType.WINDOWS, "R:", id="windows"),
    ],
)
def test_default_retention_volume(os_type: OsType, expected: str) -> None:
    # The default lives with the reprotect checks that apply it (dr.checks), above the data plane.
    assert DEFAULT_RETENTION_VOLUME[os_type] == expected
