"""What the DR jobs do differently when the recovery site is an Azure fabric.

Two seams, each a no-op for the other fabric kinds. Where a replica disk is placed: a page blob
`<item>/<disk>.vhd` in the fabric's replica container, recorded as the blob's URL (the master target
of that site, started with `--page-blob-container`, writes it; the failover imports it as a managed
disk). And what enable checks before anything is made: the failover rules ARM would otherwise
refuse only half-way through a failover (AZ-SIZE, AZ-DISKS, AZ-DISK-SIZE, AZ-QUOTA), every failing
rule listed at once, read live from ARM; the failover job checks them again before it makes anything
(quotas and the region's sizes change while a machine is protected).
"""

from __future__ import annotations

from siterecovery.dr.azure_checks import check_azure_failover, check_sas
from siterecovery.dr.fabric_access import open_fabric
from siterecovery.errors import Problem, SiteRecoveryError, Status
from siterecovery.fabrics.azure import AzureFabric
from siterecovery.fabrics.base import Disk, Fabric, FabricError, Machine, OsType, PowerState
from siterecovery.store.context import ControlPlane
from siterecovery.store.models import Fabric as FabricRow
from siterecovery.store.record import ItemRecord
from siterecovery.store.states import FabricKind


def is_page_blob(path: str) -> bool:
    """A replica disk recorded as a blob's URL (an Azure site) rather than a file path."""
    return path.startswith(("https://", "http://"))


def _azure(cp: ControlPlane, row: FabricRow) -> AzureFabric:
    fabric = open_fabric(cp, row)
    if not isinstance(fabric, AzureFabric):  # the row's kind says azure; open_fabric agrees
        raise TypeError(f"fabric {row.name} did not open as an Azure fabric")
    return fabric


def azure_replica_urls(cp: ControlPlane, row: FabricRow, item_name: str, labels: list[str]) -> dict[str, str]:
    """The URL of each (disk label's) replica page blob in the Azure fabric's replica container."""
    fabric = _azure(cp, row)
    return {label: fabric.replicas.get_blob_client(f"{item_name}/{label}.vhd").url for label in labels}


def azure_enable_problems(cp: ControlPlane, row: FabricRow, machine: Machine) -> list[Problem]:
    """Every Azure rule that would refuse this machine's failover; empty for other fabric kinds."""
    if row.kind != FabricKind.AZURE:
        return []
    return _problems(_azure(cp, row), machine)


def _problems(fabric: AzureFabric, machine: Machine) -> list[Problem]:
    try:
        capacity = fabric.capacity()
    except FabricError as exc:
        raise SiteRecoveryError(
            Problem(exc.code, exc.message, exc.remediation or "Check the Azure fabric's connection."),
            Status.UNAVAILABLE,
        ) from exc
    return [*check_azure_failover(capacity, [machine], fabric.vm_size), *check_sas(fabric.read_seconds)]


def is_azure(cp: ControlPlane, fabric_id: str) -> bool:
    with cp.db.session() as s:
        row = s.get(FabricRow, fabric_id)
        return row is not None and row.kind == FabricKind.AZURE


def ensure_azure_failover(fabric: Fabric, rec: ItemRecord) -> None:
    """Before a failover makes anything on an Azure site: every failing AZ-* rule, at once."""
    if not isinstance(fabric, AzureFabric):
        return
    machine = Machine(
        id=rec.machine,
        name=rec.cloud_machine or rec.machine,
        bios_uuid="",
        os_type=OsType(rec.os_type),
        os_version=rec.os_version,
        power_state=PowerState.OFF,
        disks=tuple(
            Disk(uuid=d.label, label=d.label, size_bytes=d.size, backing=d.cloud_path) for d in rec.disks
        ),
    )
    problems = _problems(fabric, machine)
    if problems:
        raise SiteRecoveryError(problems)
