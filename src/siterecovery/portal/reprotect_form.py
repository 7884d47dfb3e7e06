"""The Re-Protect dialog's choices, as an operator of ASR knows them (RPW-2, RPW-3, RP-RET).

Master targets and process servers come from the registered components (with health, OS and
n/60 attached disks), datastores from the target site fabric's last discovery, retention volumes
from each master target's last report: only eligible volumes are offered. The failback policy is
implied by the item's policy and shown read-only. Sensible defaults are preselected: a connected
master target of the machine's OS at the target site (only those are offered), a connected process
server at the replication source's site.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy.orm import Session

from siterecovery.config import ServerConfig
from siterecovery.control.api.policies import policy_view
from siterecovery.control.schemas import PolicyOut
from siterecovery.portal.views import (
    MasterTargetRow,
    ProcessServerRow,
    master_target_row,
    process_server_row,
    servers,
)
from siterecovery.store.models import Fabric, Policy, ReplicatedItem
from siterecovery.store.record import ItemRecord, Site
from siterecovery.store.states import ComponentKind, Direction


@dataclass(frozen=True)
class DatastoreChoice:
    name: str
    type: str
    accessible: bool
    capacity_bytes: int
    free_bytes: int


@dataclass(frozen=True)
class Choice:
    """The operator's picks (form field values)."""

    master_target: str = ""
    process_server: str = ""
    datastore: str = ""
    retention_volume: str = ""


@dataclass(frozen=True)
class ReprotectDialog:
    item_id: str
    item_name: str
    os_type: str
    source_site: Site  # where replication will come from after reprotect
    new_direction: Direction
    master_targets: list[MasterTargetRow]
    process_servers: list[ProcessServerRow]
    datastores: list[DatastoreChoice]
    policy: PolicyOut | None  # the failback (or forward) policy reprotect will use; read-only
    chosen: Choice


def _datastores(s: Session, fabric_id: str) -> list[DatastoreChoice]:
    row = s.get(Fabric, fabric_id)
    inventory = row.inventory if row is not None else {}
    return [
        DatastoreChoice(
            name=str(d.get("name")),
            type=str(d.get("type", "")),
            accessible=bool(d.get("accessible", True)),
            capacity_bytes=int(d.get("capacity_bytes", 0) or 0),
            free_bytes=int(d.get("free_bytes", 0) or 0),
        )
        for d in (inventory or {}).get("datastores", [])
    ]


def _defaults(
    given: Choice,
    os_type: str,
    source: Site,
    mts: list[MasterTargetRow],
    pss: list[ProcessServerRow],
    datastores: list[DatastoreChoice],
) -> Choice:
    mt = given.master_target or next(
        (m.server.name for m in mts if m.server.os_type == os_type and m.server.connected),
        mts[0].server.name if mts else "",
    )
    ps = given.process_server or next(
        (p.server.name for p in pss if p.server.site == source.value and p.server.connected),
        pss[0].server.name if pss else "",
    )
    usable = [d for d in datastores if d.accessible]
    datastore = given.datastore or next(
        (d.name for d in usable if d.type == "vmfs"), usable[0].name if usable else ""
    )
    chosen_mt = next((m for m in mts if m.server.name == mt), None)
    eligible = [v.name for v in chosen_mt.retention if v.eligible] if chosen_mt else []
    retention = given.retention_volume or (eligible[0] if eligible else "")
    return Choice(mt, ps, datastore, retention)


def build_dialog(s: Session, config: ServerConfig, item: ReplicatedItem, given: Choice) -> ReprotectDialog:
    rec = ItemRecord.model_validate(item.details)
    to_onprem = item.direction == Direction.FORWARD
    source = Site.CLOUD if to_onprem else Site.ONPREM
    every_mt = [master_target_row(x) for x in servers(s, config, ComponentKind.MASTER_TARGET)]
    # A master target writes the target site's disks: only those at that site are offered.
    mts = [m for m in every_mt if m.server.site == source.other.value] or every_mt
    pss = [process_server_row(x) for x in servers(s, config, ComponentKind.PROCESS)]
    datastores = _datastores(s, rec.onprem_fabric if to_onprem else rec.cloud_fabric)
    policy = s.get(Policy, item.policy_id)
    next_id = None
    if policy is not None:
        next_id = policy.failback_policy_id if to_onprem else policy.forward_policy_id
    next_policy = s.get(Policy, next_id) if next_id else None
    return ReprotectDialog(
        item_id=item.id,
        item_name=item.name,
        os_type=rec.os_type,
        source_site=source,
        new_direction=Direction.FAILBACK if to_onprem else Direction.FORWARD,
        master_targets=mts,
        process_servers=pss,
        datastores=datastores,
        policy=policy_view(next_policy) if next_policy is not None else None,
        chosen=_defaults(given, rec.os_type, source, mts, pss, datastores),
    )
