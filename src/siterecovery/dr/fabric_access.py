"""Opens a stored fabric's provider and records what its discovery found.

Credentials are decrypted only here, at the moment a provider is opened. Discovery results are
kept (as JSON) for display and for the time of the last discovery; prerequisite checks always
discover live instead of trusting this copy.
"""

from __future__ import annotations

import dataclasses
import enum
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from siterecovery.errors import Problem, SiteRecoveryError, Status
from siterecovery.fabrics.base import Fabric, FabricError, Inventory, PowerState, SiteKind
from siterecovery.lab.fabric import LabFabric
from siterecovery.store.context import ControlPlane
from siterecovery.store.models import Fabric as FabricRow
from siterecovery.store.states import FabricKind


def open_fabric(cp: ControlPlane, row: FabricRow) -> Fabric:
    # The vSphere, Azure and libvirt providers are loaded when a fabric of their kind is opened:
    # their SDKs are heavy (pyVmomi, the Azure SDK) or an extra (libvirt-python); not a cycle.
    conn = row.connection
    if row.kind == FabricKind.LAB:
        return LabFabric(Path(str(conn["path"])), str(conn.get("site") or row.site))
    if row.kind == FabricKind.VSPHERE:
        from siterecovery.fabrics.vsphere import VSphereFabric

        return VSphereFabric(
            str(conn["host"]),
            int(conn.get("port", 443)),
            str(conn["user"]),
            cp.box.open(row.secret_encrypted),
            bool(conn.get("insecure", False)),
            conn.get("datacenter"),
            name=row.name,
        )
    if row.kind == FabricKind.AZURE:
        from siterecovery.fabrics.azure_sdk import open_azure

        return open_azure(row.name, row.site, conn, cp.box.open(row.secret_encrypted))
    if row.kind == FabricKind.LIBVIRT:
        try:
            # The libvirt fabric with the lab's VM guest as its oracle (a layer above fabrics).
            from siterecovery.lab.libvirt_oracle import LibvirtGuestFabric
        except ImportError as exc:  # libvirt-python is an extra
            raise SiteRecoveryError(
                Problem(
                    "libvirt-binding-missing",
                    "This configuration server has no libvirt binding, so it cannot open libvirt fabrics.",
                    "Install it on the server: apt-get install libvirt-dev pkg-config gcc, then "
                    "pip install 'siterecovery[libvirt]'.",
                ),
                Status.UNPROCESSABLE,
            ) from exc

        # Credentials are the URI's business (SSH keys, SASL, TLS certificates on the server).
        return LibvirtGuestFabric(
            str(conn["uri"]), name=row.name, site=row.site, domain_type=str(conn.get("domain_type", ""))
        )
    raise SiteRecoveryError(
        Problem(
            "fabric-kind-unsupported",
            f"Fabric {row.name} has kind {row.kind!r}, which this server cannot open.",
            "Use a lab, vsphere, azure or libvirt fabric.",
        ),
        Status.UNPROCESSABLE,
    )


def to_jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, (frozenset, set)):
        return sorted(to_jsonable(v) for v in value)
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    return value


def discover(cp: ControlPlane, row: FabricRow) -> Inventory:
    """Discover live and store the result on the row; a provider failure becomes a clear problem."""
    fabric = open_fabric(cp, row)
    try:
        inventory = fabric.discover()
    except FabricError as exc:
        row.discovery_error = exc.message
        raise SiteRecoveryError(
            Problem(
                exc.code,
                exc.message,
                exc.remediation or "Check the fabric's connection and credentials, then discover again.",
            ),
            Status.UNAVAILABLE,
        ) from exc
    except (OSError, ValueError) as exc:
        # What the provider did not anticipate (a lab folder it may not read, a file that is not
        # a lab's inventory) is still the fabric's fault, never the server's.
        row.discovery_error = f"{type(exc).__name__}: {exc}"[:500]
        raise SiteRecoveryError(
            Problem(
                "fabric-unreadable",
                f"Fabric {row.name} could not be discovered: {row.discovery_error}",
                "Check the fabric's connection (a lab's folder, a vCenter's address), then discover again.",
            ),
            Status.UNAVAILABLE,
        ) from exc
    finally:
        # A provider holding a session (a vCenter login) ends it: every check discovers anew, and
        # vCenter caps the sessions an account may keep open.
        close = getattr(fabric, "close", None)
        if callable(close):
            close()
    row.inventory = to_jsonable(inventory)
    row.last_discovery_at = time.time()
    row.discovery_error = ""
    return inventory


class _Recorded(BaseModel):
    # The stored copy is JSON written by `to_jsonable` from an `Inventory`; reads take the fields
    # they need and ignore the rest, so older rows with fewer or more fields still read.
    model_config = ConfigDict(extra="ignore", frozen=True)


class RecordedObject(_Recorded):
    """A host, datastore, network or resource group of the recorded discovery (counted, listed)."""

    name: str = ""


class RecordedMachine(_Recorded):
    """A machine of the recorded discovery, with what the server reads without discovering again."""

    id: str = ""
    name: str
    power_state: PowerState | None = None
    host: str = ""


class RecordedInventory(_Recorded):
    """A fabric's last discovery as stored: display and cheap defaults only; prerequisite checks
    discover live (see the module paragraph). Empty when the fabric was never discovered."""

    kind: SiteKind | None = None
    hosts: tuple[RecordedObject, ...] = ()
    datastores: tuple[RecordedObject, ...] = ()
    machines: tuple[RecordedMachine, ...] = ()
    resource_groups: tuple[RecordedObject, ...] = ()
    networks: tuple[RecordedObject, ...] = ()
    warnings: tuple[str, ...] = ()

    def holds(self, machine: str) -> bool:
        return any(m.name == machine for m in self.machines)


class FabricSummary(_Recorded):
    """How much the last discovery found, and why it may have seen less (the API's `summary`)."""

    hosts: int = 0
    datastores: int = 0
    machines: int = 0
    resource_groups: int = 0
    networks: int = 0
    warnings: list[str] = Field(default_factory=list)


def recorded(row: FabricRow) -> RecordedInventory:
    return RecordedInventory.model_validate(row.inventory or {})


def summary(row: FabricRow) -> FabricSummary:
    inv = recorded(row)
    return FabricSummary(
        hosts=len(inv.hosts),
        datastores=len(inv.datastores),
        machines=len(inv.machines),
        resource_groups=len(inv.resource_groups),
        networks=len(inv.networks),
        warnings=list(inv.warnings),
    )
