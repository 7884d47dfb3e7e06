"""Where an item's disks live on each site, and the names of its pairs and agents."""

from __future__ import annotations

import re
from pathlib import Path

from siterecovery.dr.azure_jobs import azure_replica_urls
from siterecovery.dr.platforms import libvirt_replica_dir
from siterecovery.errors import Problem, SiteRecoveryError, Status, not_found
from siterecovery.store.context import current
from siterecovery.store.models import Fabric as FabricRow
from siterecovery.store.states import FabricKind


def replica_paths(cloud_fabric_id: str, item_name: str, labels: list[str], pool: str = "") -> dict[str, str]:
    """Path of each (disk label's) cloud replica disk: `<label>.img` in the lab cloud site's
    managed-disk folder of the item, or volume `<machine>_<label>.img` in the directory of storage
    pool `pool` on a libvirt host (named as the fabric names a domain's own volumes), or the URL of
    page blob `<item>/<label>.vhd` in an Azure fabric's replica container."""
    with current().db.session() as s:
        row = s.get(FabricRow, cloud_fabric_id)
        if row is None:
            raise not_found("fabric", cloud_fabric_id)
        if row.kind == FabricKind.LIBVIRT:
            folder = libvirt_replica_dir(row, pool)
            return {label: str(folder / f"{item_name}_{label}.img") for label in labels}
        if row.kind == FabricKind.AZURE:
            return azure_replica_urls(current(), row, item_name, labels)
    folder = replica_dir(cloud_fabric_id, item_name)
    return {label: str(folder / f"{label}.img") for label in labels}


def replica_dir(cloud_fabric_id: str, item_name: str) -> Path:
    """Folder of an item's cloud replica disks (managed disks of the lab's cloud site)."""
    with current().db.session() as s:
        row = s.get(FabricRow, cloud_fabric_id)
        if row is None:
            raise not_found("fabric", cloud_fabric_id)
        if row.kind != FabricKind.LAB:
            raise SiteRecoveryError(
                Problem(
                    "target-fabric-unsupported",
                    f"Fabric {row.name} ({row.kind}) cannot hold replica disks.",
                    "Replicate to a lab cloud site, a libvirt host or an Azure fabric.",
                ),
                Status.UNPROCESSABLE,
            )
        return Path(str(row.connection["path"])) / "cloud" / "replicas" / item_name


def pair_id(item_id: str, generation: int, disk: str) -> str:
    """`<item>.g<generation>.<disk>`: every hop makes it a directory name, so it keeps to the strict
    pattern (`PAIR_ID_PATTERN`); a disk label such as vSphere's "Hard disk 1" becomes "Hard-disk-1"."""
    label = re.sub(r"[^A-Za-z0-9._-]", "-", disk)
    return f"{item_id}.g{generation}.{label}"[:128]
