"""The typed record of a replicated item kept in its `details` column.

Everything the workflows need to know about where an item's disks are and how they replicate
right now, so desired state for agents and master targets is derived from items, never stored
twice.
"""

from __future__ import annotations

from enum import StrEnum

from pydantic import BaseModel, ConfigDict, Field

from siterecovery.dataplane.assignments import SyncMode


class Site(StrEnum):
    ONPREM = "onprem"
    CLOUD = "cloud"

    @property
    def other(self) -> Site:
        return Site.CLOUD if self is Site.ONPREM else Site.ONPREM


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ItemDisk(_Model):
    label: str
    size: int
    onprem_path: str
    onprem_uuid: str
    cloud_path: str

    def path(self, site: Site) -> str:
        return self.onprem_path if site is Site.ONPREM else self.cloud_path


class Pair(_Model):
    pair_id: str
    disk: str
    source: str  # image the agent exports and replicates
    target: str  # disk the master target writes
    size: int


class Replication(_Model):
    """The item's current replication: from `source_site` through a process server to a master target."""

    source_site: Site
    source_machine: str
    process_server: str  # component id
    master_target: str  # component id
    retention_volume: str = ""
    sync_mode: SyncMode = SyncMode.FULL
    generation: int = 1
    pairs: list[Pair] = Field(default_factory=list)
    # Recovery point each pair is held at on the master target (point ids); empty = follow latest.
    points: dict[str, str] = Field(default_factory=dict)


class NicRecord(_Model):
    name: str
    mac: str
    ip_mode: str
    address: str = ""
    prefix: int = 0
    gateway: str = ""


class StepMetric(_Model):
    """One step of the DR cycle as the demo's closing table shows it."""

    step: str
    seconds: float
    bytes_changed: int = 0
    bytes_sent: int = 0
    rpo_seconds: float | None = None
    downtime_seconds: float | None = None
    oracle: str = ""


class BookmarkRecord(_Model):
    """A bookmark asked of the item's agent: an app-consistent point (freeze hook) or a group tag."""

    tag: str
    kind: str  # "app" | "group"
    requested_at: float
    freeze: bool = True


class TestCopy(_Model):
    request_id: str
    pair_id: str
    point: str
    out_path: str
    label: str


class TestFailover(_Model):
    """A test failover: disposable copies of a point and the isolated machine that runs them."""

    point: str
    machine: str
    copies: list[TestCopy] = Field(default_factory=list)


class HeldPoint(_Model):
    """A recovery point listed when replication stopped for a failover (see `HeldFailover`)."""

    id: str
    kind: str
    time: float
    disks: dict[str, str]  # pair id -> that disk's point id


class HeldFailover(_Model):
    """A failover not committed yet: its point can still change.

    The master target keeps the stopped replication's journals (closed, not deleted) and the
    recovery machine got a snapshot before it booted. Changing the point reverts the snapshot,
    lets the master target hold the pairs again (`attached`) to roll them to the new point, then
    snapshots and boots the machine again. Commit removes the snapshot and forgets all this.
    """

    replication: Replication  # its `points` say where the disks are (empty: latest)
    site: Site  # where the recovery machine runs
    machine: str
    points: list[HeldPoint] = Field(default_factory=list)  # newest first, as `points list` showed
    snapshot: str = ""  # id of the recovery machine's snapshot taken before it booted
    attached: bool = False  # the master target holds the pairs (a point change is rolling them)


class EndedPair(_Model):
    """A pair whose replication ended for good (commit, disable): its journal and cache can go."""

    master_target: str  # component ids
    process_server: str = ""
    pair_id: str


MAX_ENDED_PAIRS = 64


class ItemRecord(_Model):
    onprem_fabric: str  # fabric ids
    cloud_fabric: str
    machine: str  # the on-premises machine's name
    cloud_machine: str = ""
    cloud_resource_group: str = ""
    os_type: str
    os_version: str = ""
    physical: bool = False
    disks: list[ItemDisk] = Field(default_factory=list)
    nics: list[NicRecord] = Field(default_factory=list)
    packages: list[str] = Field(default_factory=list)
    active_site: Site = Site.ONPREM
    replication: Replication | None = None
    # Set by a failover until commit: which point the recovery machine runs from.
    failover_point: dict[str, object] = Field(default_factory=dict)
    held: HeldFailover | None = None  # from failover to commit
    ended_pairs: list[EndedPair] = Field(default_factory=list)  # the newest MAX_ENDED_PAIRS

    def end_pairs(self, rep: Replication) -> None:
        """Replication `rep` ended for good: its journals go (kept while the point could change)."""
        self.ended_pairs += [
            EndedPair(master_target=rep.master_target, process_server=rep.process_server, pair_id=p.pair_id)
            for p in rep.pairs
        ]
        del self.ended_pairs[:-MAX_ENDED_PAIRS]

    placed_disks: list[dict[str, str]] = Field(default_factory=list)  # RP-MT-MOVE: uuid, backing
    test: TestFailover | None = None
    bookmarks: list[BookmarkRecord] = Field(default_factory=list)  # the newest few
    last_generation: int = 0  # replication generations so far: pair ids never repeat
    target_created: bool = False  # reprotect created the on-premises machine anew (RPW-6): full copy
    metrics: list[StepMetric] = Field(default_factory=list)
    oracle: dict[str, object] = Field(default_factory=dict)  # last verdict per site
    # A libvirt domain's persistent XML at enable: failover defines the recovery domain from it.
    domain_xml: str = ""
    # Agentless failback from Azure: the snapshot (prefix `<vm>-<name>`) the on-premises disks
    # were last made equal to; the next sync sends what changed since (dr/azure_failback.py).
    azure_base: str = ""
    # The sync snapshot being written onto the on-premises disks; a sync that died half-way
    # completes it before anything else (the disks may hold part of it).
    azure_pending: str = ""
