"""Hollow components and a seeded inventory for the scale bench and the scale tests.

As Kubernetes' kubemark hollow nodes do, a hollow component is the real component's control-plane
half only: it registers with the configuration server's real API (passphrase, certificate, token)
and heartbeats realistic statistics, with no data plane behind it. `seed` writes N replicated items
through the product's own models (the same rows a protect job writes), each replicating through
one of the process servers to one of the master targets.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

from siterecovery.dataplane.assignments import (
    AgentStats,
    CacheHealth,
    MasterTargetPairStats,
    MasterTargetStats,
    PairState,
    PairStats,
    PointInfo,
    ProcessServerStats,
)
from siterecovery.store.context import ControlPlane
from siterecovery.store.models import Component, Policy, ReplicatedItem, new_id, now
from siterecovery.store.record import ItemDisk, ItemRecord, Pair, Replication, Site
from siterecovery.store.states import ComponentKind

DISKS_PER_ITEM = 2


@dataclass
class Inventory:
    """What `seed` created: component ids by kind, and per item its agent name and pair ids."""

    process_servers: list[str] = field(default_factory=list)
    master_targets: list[str] = field(default_factory=list)
    items: list[tuple[str, str, list[str]]] = field(default_factory=list)  # id, agent name, pairs

    def pairs_of_mt(self, mt: str) -> list[str]:
        return [p for i, (_, _, pairs) in enumerate(self.items) if self.mt_of(i) == mt for p in pairs]

    def mt_of(self, index: int) -> str:
        return self.master_targets[index % len(self.master_targets)]

    def ps_of(self, index: int) -> str:
        return self.process_servers[index % len(self.process_servers)]


def machine_name(index: int) -> str:
    return f"vm{index:05d}"


def seed(
    cp: ControlPlane,
    items: int,
    process_servers: int = 1,
    master_targets: int = 1,
    start: int = 0,
    first_component: int = 0,
) -> Inventory:
    """N protected items (and the PS/MT rows they name, if not there yet) in one transaction.

    Items are numbered from `start`; they replicate round-robin through process servers and to
    master targets numbered from `first_component` (named `<kind>-<n>`, as hollow ones register).
    """
    inv = Inventory()
    with cp.db.session() as s:
        if s.get(Policy, "scale-policy") is None:
            s.add(
                Policy(
                    id="scale-policy",
                    name="scale",
                    kind="replication",
                    rpo_threshold_seconds=900,
                    retention_seconds=86400,
                    app_consistent_frequency_seconds=0,
                )
            )
        for kind, count, out in (
            (ComponentKind.PROCESS, process_servers, inv.process_servers),
            (ComponentKind.MASTER_TARGET, master_targets, inv.master_targets),
        ):
            for n in range(first_component, first_component + count):
                cid = f"{kind.value}-scale-{n}"
                if s.get(Component, cid) is None:
                    s.add(Component(id=cid, kind=kind.value, name=f"{kind.value}-{n}", site="cloud"))
                out.append(cid)
        s.flush()
        for index in range(start, start + items):
            machine = machine_name(index)
            pairs = [f"{machine}-g1-d{d}" for d in range(DISKS_PER_ITEM)]
            rec = ItemRecord(
                onprem_fabric="fabric-onprem",
                cloud_fabric="fabric-cloud",
                machine=machine,
                os_type="linux",
                disks=[
                    ItemDisk(
                        label=f"disk{d}",
                        size=64 << 30,
                        onprem_path=f"/vms/{machine}/disk{d}.qcow2",
                        onprem_uuid=f"{machine}-uuid-{d}",
                        cloud_path=f"/cloud/{machine}/disk{d}.img",
                    )
                    for d in range(DISKS_PER_ITEM)
                ],
                replication=Replication(
                    source_site=Site.ONPREM,
                    source_machine=machine,
                    process_server=inv.ps_of(index),
                    master_target=inv.mt_of(index),
                    retention_volume="/retention",
                    pairs=[
                        Pair(
                            pair_id=p,
                            disk=f"disk{d}",
                            source=f"/vms/{machine}/disk{d}.qcow2",
                            target=f"/cloud/{machine}/disk{d}.img",
                            size=64 << 30,
                        )
                        for d, p in enumerate(pairs)
                    ],
                ),
                last_generation=1,
            )
            s.add(
                ReplicatedItem(
                    id=new_id("item"),
                    name=machine,
                    machine=machine,
                    source_fabric_id="fabric-onprem",
                    target_fabric_id="fabric-cloud",
                    direction="onprem-to-cloud",
                    state="protected",
                    policy_id="scale-policy",
                    process_server_id=inv.ps_of(index),
                    master_target_id=inv.mt_of(index),
                    details=rec.model_dump(mode="json"),
                    updated_at=now(),
                )
            )
            inv.items.append((machine, f"onprem/{machine}", pairs))
    return inv


def agent_stats(pairs: list[str], seq: int) -> dict[str, Any]:
    return AgentStats(
        pairs=[
            PairStats(
                pair_id=p,
                state=PairState.PROTECTED,
                bytes_done=64 << 30,
                bytes_total=64 << 30,
                bytes_sent=seq * 65536,
                captured_seq=seq,
                acked_seq=seq,
                last_write_time=time.time(),
            )
            for p in pairs
        ]
    ).model_dump(mode="json")


def process_server_stats(pairs: int) -> dict[str, Any]:
    return ProcessServerStats(
        cache_used_bytes=1 << 30,
        cache_capacity_bytes=100 << 30,
        cache_free_percent=99.0,
        cache_health=CacheHealth.OK,
        backlog_bytes=0,
        throughput_bytes_per_s=1e6,
        drain_seconds=None,
        pairs=pairs,
    ).model_dump(mode="json")


def master_target_stats(pairs: list[str], seq: int, points_per_pair: int) -> dict[str, Any]:
    t = time.time()
    return MasterTargetStats(
        pairs=[
            MasterTargetPairStats(
                pair_id=p,
                applied_seq=seq,
                last_applied_time=t,
                points=[
                    PointInfo(id=f"{p}-pt{k}", kind="crash", time=t - 300 * (points_per_pair - k), seq=k)
                    for k in range(points_per_pair)
                ],
                journal_bytes=1 << 30,
            )
            for p in pairs
        ],
        attached_disks=len(pairs),
    ).model_dump(mode="json")


@dataclass
class Hollow:
    """One hollow component: registered through the API, heartbeats with its version of desired."""

    kind: str
    name: str
    pairs: list[str]
    points_per_pair: int = 0
    component_id: str = ""
    token: str = ""
    version: str | None = None
    seq: int = 0

    def register(self, http: httpx.Client, passphrase: str) -> None:
        r = http.post(
            "/api/components/register",
            json={"passphrase": passphrase, "kind": self.kind, "name": self.name, "site": "onprem"},
        )
        r.raise_for_status()
        body = r.json()
        self.component_id, self.token = body["id"], body["token"]

    def stats(self) -> dict[str, Any]:
        self.seq += random.randint(0, 3)
        if self.kind == ComponentKind.AGENT.value:
            return agent_stats(self.pairs, self.seq)
        if self.kind == ComponentKind.MASTER_TARGET.value:
            return master_target_stats(self.pairs, self.seq, self.points_per_pair)
        return process_server_stats(len(self.pairs))

    def heartbeat(self, http: httpx.Client) -> httpx.Response:
        body: dict[str, Any] = {"stats": self.stats()}
        if self.version:
            body["desired_version"] = self.version
        r = http.post(
            f"/api/components/{self.component_id}/heartbeat",
            json=body,
            headers={"Authorization": f"Bearer {self.token}"},
        )
        if r.status_code == 200:
            self.version = r.json().get("desired_version") or None
        return r
