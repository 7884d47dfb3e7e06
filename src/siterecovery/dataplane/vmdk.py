"""Replica disks as VMDKs on the datastores mounted on the master target's host.

On vSphere the master target writes a protected machine's disks through the datastore its host
mounts read/write: a disk's vCenter backing `[datastore] folder/name.vmdk` is the descriptor, and
its bytes live in the flat extent it names (`name-flat.vmdk`), which is what the master target
applies writes to. `DatastoreMounts.place()` turns an attached disk's datastore path into that
local flat extent: it maps the datastore to its local mount (`--datastore NAME=DIR`), keeps the
path inside the mount, and, when the descriptor is missing or empty (vCenter or the simulator
created the disk but no data was ever written), writes a VMFS-style descriptor and sizes the flat
extent. An existing descriptor is kept if it has exactly one flat extent at offset 0 large enough
for the disk; anything else (sparse, SE-sparse, several extents) is refused rather than guessed.
"""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import Mapping
from pathlib import Path

from siterecovery.dataplane.assignments import AttachedDisk
from siterecovery.errors import Problem, SiteRecoveryError, Status

SECTOR = 512
_DATASTORE_PATH = re.compile(r"^\[(?P<ds>[^\]]+)\]\s*(?P<rel>.+)$")
_EXTENT = re.compile(r'^(RW|RDONLY|NOACCESS)\s+(\d+)\s+(FLAT|VMFS)\s+"([^"]+)"(?:\s+(\d+))?\s*$')


def descriptor(size: int, flat_name: str) -> str:
    """A VMFS flat-disk descriptor of `size` bytes (what ESXi writes for a thick or thin disk)."""
    sectors = -(-size // SECTOR)
    heads, spt = 255, 63
    cylinders = max(1, sectors // (heads * spt))
    ddb_uuid = " ".join(f"{b:02x}" for b in uuid.uuid4().bytes)
    return (
        "# Disk DescriptorFile\n"
        "version=1\n"
        'encoding="UTF-8"\n'
        f"CID={uuid.uuid4().int & 0xFFFFFFFE:08x}\n"
        "parentCID=ffffffff\n"
        'createType="vmfs"\n'
        "\n"
        "# Extent description\n"
        f'RW {sectors} VMFS "{flat_name}"\n'
        "\n"
        "# The Disk Data Base\n"
        "#DDB\n"
        "\n"
        'ddb.adapterType = "lsilogic"\n'
        f'ddb.geometry.cylinders = "{cylinders}"\n'
        f'ddb.geometry.heads = "{heads}"\n'
        f'ddb.geometry.sectors = "{spt}"\n'
        f'ddb.uuid = "{ddb_uuid}"\n'
        'ddb.virtualHWVersion = "13"\n'
    )


def _unsupported(path: Path, why: str) -> SiteRecoveryError:
    return SiteRecoveryError(
        Problem(
            code="mt-vmdk-unsupported",
            message=f"Replica disk {path} cannot be written as a flat VMDK: {why}.",
            remediation="Use a thick or thin disk (one flat extent), or let the reprotect create it.",
        ),
        Status.UNPROCESSABLE,
    )


def flat_extent(descriptor_path: Path, size: int) -> Path:
    """The flat extent holding the disk's bytes, creating descriptor and extent when missing or empty."""
    text = descriptor_path.read_text(errors="replace") if descriptor_path.exists() else ""
    if not text.strip():
        flat = descriptor_path.with_name(f"{descriptor_path.stem}-flat.vmdk")
        descriptor_path.parent.mkdir(parents=True, exist_ok=True)
        with open(flat, "ab") as f:
            if os.fstat(f.fileno()).st_size < size:
                f.truncate(size)
        tmp = descriptor_path.with_name(f".{descriptor_path.name}.tmp")
        tmp.write_text(descriptor(size, flat.name))
        os.replace(tmp, descriptor_path)
        return flat
    extents = [m for m in (_EXTENT.match(line.strip()) for line in text.splitlines()) if m]
    if 'createType="vmfs"' not in text and 'createType="monolithicFlat"' not in text:
        raise _unsupported(descriptor_path, "its createType is not a flat disk")
    if len(extents) != 1:
        raise _unsupported(descriptor_path, f"it has {len(extents)} flat extents, not one")
    (ext,) = extents
    if ext.group(1) != "RW" or int(ext.group(5) or 0) != 0 or int(ext.group(2)) * SECTOR < size:
        raise _unsupported(descriptor_path, "its extent is not writable, starts past 0, or is too small")
    return descriptor_path.parent / ext.group(4)


class DatastoreMounts:
    """The datastores mounted on the master target's host: datastore name → local directory."""

    def __init__(self, mounts: Mapping[str, Path]) -> None:
        self.mounts = dict(mounts)

    @classmethod
    def parse(cls, specs: list[str]) -> DatastoreMounts:
        """From `NAME=DIR` options."""
        mounts: dict[str, Path] = {}
        for spec in specs:
            name, sep, folder = spec.partition("=")
            if not sep or not name or not folder:
                raise SiteRecoveryError(
                    Problem(
                        code="invalid-input",
                        message=f"--datastore {spec!r} is not NAME=DIR.",
                        remediation="Give the name and mount point: datastore1=/vmfs/volumes/ds1.",
                    ),
                    Status.BAD_REQUEST,
                )
            mounts[name] = Path(folder)
        return cls(mounts)

    def place(self, disk: AttachedDisk) -> AttachedDisk:
        """The disk with its datastore path replaced by the local file writes go to."""
        match = _DATASTORE_PATH.match(str(disk.path))
        if match is None:
            return disk  # a local image path already
        name, rel = match.group("ds"), match.group("rel").strip()
        mount = self.mounts.get(name)
        if mount is None:
            raise SiteRecoveryError(
                Problem(
                    code="mt-datastore-not-mounted",
                    message=f"Datastore {name} of disk {disk.path} is not mounted on this master target.",
                    remediation="Mount the datastore read/write on the master target's host and start it "
                    f"with --datastore {name}=<mount point>.",
                ),
                Status.CONFLICT,
            )
        local = (mount / rel).resolve()
        if not local.is_relative_to(mount.resolve()):
            raise _unsupported(disk.path, "its path leaves the datastore")
        if local.suffix == ".vmdk":
            local = flat_extent(local, disk.size)
        return disk.model_copy(update={"path": local})
