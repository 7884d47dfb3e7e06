"""Desired state of agents and master targets, derived from the replicated items.

A component's desired state is never stored on its own: on every heartbeat it is computed from
the items whose current replication names it, so there is one source of truth and a workflow
changes replication by changing an item.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from siterecovery.control.db import Component, ReplicatedItem
from siterecovery.control.states import ComponentKind
from siterecovery.dataplane.assignments import (
    AgentDesired,
    AttachedDisk,
    DiskReplication,
    MasterTargetDesired,
)
from siterecovery.dr.record import ItemRecord, Replication


def agent_name(site: str, machine: str) -> str:
    """Agents are named by site and machine: a failed-over machine keeps its name in the cloud."""
    return f"{site}/{machine}"


def _replicating(s: Session) -> Iterator[tuple[ReplicatedItem, Replication]]:
    for item in s.scalars(select(ReplicatedItem)):
        rec = ItemRecord.model_validate(item.details)
        if rec.replication is not None:
            yield item, rec.replication


def _address(s: Session, component_id: str) -> str:
    row = s.get(Component, component_id)
    return row.address if row is not None else ""


def agent_desired(s: Session, agent: Component) -> AgentDesired:
    replications = []
    for _item, rep in _replicating(s):
        if agent_name(rep.source_site.value, rep.source_machine) != agent.name:
            continue
        ps, mt = _address(s, rep.process_server), _address(s, rep.master_target)
        replications += [
            DiskReplication(
                pair_id=p.pair_id,
                disk=p.disk,
                image=Path(p.source),
                process_server=ps,
                master_target=mt,
                sync_mode=rep.sync_mode,
                generation=rep.generation,
            )
            for p in rep.pairs
        ]
    return AgentDesired(replications=replications)


def master_target_desired(s: Session, mt: Component) -> MasterTargetDesired:
    disks = []
    retention = ""
    for _item, rep in _replicating(s):
        if rep.master_target != mt.id:
            continue
        retention = retention or rep.retention_volume
        disks += [AttachedDisk(pair_id=p.pair_id, path=Path(p.target), size=p.size) for p in rep.pairs]
    return MasterTargetDesired(disks=disks, retention_volume=Path(retention) if retention else None)


def desired_for(s: Session, component: Component) -> dict[str, Any]:
    """The JSON desired state a heartbeat returns to this component."""
    if component.kind == ComponentKind.AGENT.value:
        return agent_desired(s, component).model_dump(mode="json")
    if component.kind == ComponentKind.MASTER_TARGET.value:
        return master_target_desired(s, component).model_dump(mode="json")
    return dict(component.desired)
