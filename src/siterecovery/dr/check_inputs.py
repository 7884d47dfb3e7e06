"""The typed values prerequisite checks read: the item, its components, the request, both sites.

A workflow (or `--what-if`) builds one `Situation` (failback) or `ReprotectContext` (reprotect)
from the configuration server's records and from inventories it has just discovered through the
`Fabric` interface, then hands it to `dr.checks`. Nothing here performs I/O, so checks can be
tested with constructed values and reused by every provider. "Never registered" and "never
discovered" are `None`, not sentinels, so a check cannot mistake them for a real value.
"""

from __future__ import annotations

from dataclasses import dataclass

from siterecovery.fabrics.base import Inventory, OsType
from siterecovery.store.states import Direction, ProtectionState


@dataclass(frozen=True)
class PlacedDisk:
    """A disk reprotect attached to the master target: its UUID and where it was then (RP-MT-MOVE)."""

    uuid: str
    backing: str


@dataclass(frozen=True)
class ItemView:
    """A replicated item as the configuration server records it."""

    id: str
    machine: str  # the on-premises machine it protects (inventory id or name)
    cloud_machine: str  # the machine the failover created in the cloud
    cloud_resource_group: str  # the resource group the failover put it in
    os_type: OsType
    os_version: str
    physical: bool  # protected as a physical server (fails back as a new VM)
    state: ProtectionState  # the configuration server's own state of the item
    direction: Direction  # of its current (or last) replication
    machine_recorded: bool  # the database still holds the on-prem machine's record (CS-1)
    disk_count: int  # replicated disks: what reprotect attaches to the master target
    group: str | None = None  # replication group
    # Components serving its current (failback-direction) replication; empty before reprotect.
    master_target: str = ""
    process_server: str = ""
    placed_disks: tuple[PlacedDisk, ...] = ()


@dataclass(frozen=True)
class ComponentView:
    """A registered component (agent, process server): its name and heartbeat age in seconds."""

    name: str
    heartbeat_age: float | None  # None: it never sent one

    def connected(self, timeout: float) -> bool:
        return self.heartbeat_age is not None and self.heartbeat_age <= timeout


@dataclass(frozen=True)
class RetentionVolumeView:
    """A volume of a master target and whether it may hold recovery points (RP-RET)."""

    name: str
    eligible: bool
    reason: str = ""  # the eligibility criterion it fails, e.g. "its file system is FAT32"


@dataclass(frozen=True)
class MasterTargetView:
    """A registered master target and the on-premises VM that runs it."""

    name: str
    heartbeat_age: float | None  # None: it never sent one
    os_type: OsType
    machine: str  # its VM in the on-premises inventory (id or name)
    retention_volumes: tuple[RetentionVolumeView, ...] = ()

    def connected(self, timeout: float) -> bool:
        return self.heartbeat_age is not None and self.heartbeat_age <= timeout


@dataclass(frozen=True)
class GroupMember:
    """Another member of the item's replication group."""

    item: str  # its name or id, for messages
    os_type: OsType
    master_target: str | None  # the one the request (recovery plan) gives it; None if none


@dataclass(frozen=True)
class ReprotectRequest:
    """What the operator asked for (RPW-3); the failback policy is implied."""

    master_target: str
    process_server: str
    datastore: str | None
    retention_volume: str | None  # None: the master target's default (R: / /mnt/retention)
    via_plan: bool = False  # requested through a recovery plan (RP-GROUP-PLAN)


@dataclass(frozen=True, kw_only=True)
class Situation:
    """One item, its components and both sites at one instant: what failback is checked against."""

    item: ItemView
    vcenter: str  # the vCenter failed back to (the original or an alternate one)
    onprem: Inventory | None  # its inventory; None: the configuration server has not discovered it
    cloud: Inventory
    master_target: MasterTargetView | None  # None: no master target of that name is registered
    process_server: ComponentView | None  # None: no process server of that name is registered
    agent: ComponentView | None  # the item's agent; None: not registered since the cloud boot
    heartbeat_timeout: float  # seconds; ServerConfig.heartbeat_timeout


@dataclass(frozen=True, kw_only=True)
class ReprotectContext(Situation):
    """A `Situation` plus the reprotect request and what else it touches."""

    request: ReprotectRequest
    group: tuple[GroupMember, ...] = ()  # the other members of item.group
    # Disks that other items of the same request, or reprotect jobs still running, will attach
    # to the same master target: inventory does not show them yet (MT-3).
    pending_mt_disks: int = 0
