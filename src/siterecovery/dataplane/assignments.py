"""Desired state and statistics of data-plane components: the heartbeat contract's payloads.

A component heartbeats `{"stats": <its Stats model>}` to the configuration server and receives
`{"desired": <its Desired model>}`; it reconciles toward `desired` idempotently. The same Desired
models are read from an `--assignments FILE` (JSON) when a data plane runs without a configuration
server. The configuration server stores and serves exactly these models.
"""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


# Pair ids become directory names on every hop: one strict pattern (no separators, no leading dot).
PAIR_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
PairId = Annotated[str, Field(pattern=PAIR_ID_PATTERN)]


def _revoked() -> list[str]:
    return Field(default=[], description="revoked certificate serials (hex): refused on every link")


class PeerRefusal(_Model):
    """A peer a hop refused (wrong kind, not assigned, revoked, out-of-bounds frame): becomes an event."""

    number: int = Field(description="counts refusals since the component started")
    time: float
    peer: str = Field(description='"<kind>:<component id>" from its certificate')
    address: str
    pair_id: str = ""
    code: str
    message: str


class SyncMode(StrEnum):
    FULL = "full"  # copy every allocated block (new or unknown target)
    DELTA = "delta"  # compare block digests, send only the blocks that differ (RPW-6)


class PairState(StrEnum):
    INITIAL_SYNC = "initial-sync"
    PROTECTED = "protected"
    RESYNC_REQUIRED = "resync-required"
    PAUSED = "paused"


class CacheHealth(StrEnum):
    OK = "ok"
    WARNING = "warning"  # cache free < 30 %
    CRITICAL = "critical"  # cache free < 25 %


# --- agent ------------------------------------------------------------------------------------


class DiskReplication(_Model):
    """One disk the agent exports over NBD and replicates."""

    pair_id: PairId
    disk: str = Field(description="disk label; also the NBD export name")
    image: Path | None = Field(default=None, description="image path; else from the agent's --disk")
    process_server: str = Field(description="host:port of the process server's data listener")
    master_target: str = Field(description="host:port the process server forwards to")
    process_server_id: str = Field(default="", description="its certificate must name this id")
    sync_mode: SyncMode = SyncMode.FULL
    # Raising the generation asks for a new initial sync of the pair (e.g. after reprotect).
    generation: int = 1
    paused: bool = False


class BookmarkRequest(_Model):
    """Insert a recovery point into every pair of the agent at once (done once per tag)."""

    tag: str
    kind: str = Field(description='"app" | "group" | "crash"')
    freeze: bool = Field(default=True, description="run the freeze hook first (app-consistent)")


class AgentDesired(_Model):
    replications: list[DiskReplication] = []
    bookmarks: list[BookmarkRequest] = []
    # A crash bookmark goes into all the agent's pairs at once this often, if anything was written.
    crash_interval_seconds: float = 5.0
    revoked: list[str] = _revoked()


class PairStats(_Model):
    pair_id: str
    state: PairState
    bytes_done: int = 0
    bytes_total: int = 0
    bytes_sent: int = 0
    captured_seq: int = -1
    acked_seq: int = -1
    last_write_time: float | None = None
    spool_bytes: int = 0


# A path the agent reports: absolute, no control characters (it goes into a libvirt domain's XML).
_PATH_PATTERN = r"^/[^\x00-\x1f\x7f]{0,4095}$"


class DiskExport(_Model):
    """A disk the agent serves (its `--disk LABEL=PATH`) and where: what a libvirt domain's disk
    source becomes when the configuration server puts capture in place (docs/libvirt.md)."""

    disk: str = Field(pattern=r"^[^\x00-\x1f\x7f@]{1,200}$", description="label; the NBD export name")
    image: str = Field(pattern=_PATH_PATTERN, description="the image it serves, an absolute path")
    socket: str = Field(
        default="", pattern=r"^(/[^\x00-\x1f\x7f]{0,4095})?$", description="its Unix socket; empty: none"
    )


class AgentStats(_Model):
    pairs: list[PairStats] = []
    exports: list[DiskExport] = Field(default=[], description="the disks it serves (capture on libvirt)")
    bookmarks_done: list[str] = Field(default=[], description="the last tags done, oldest first")
    bookmark_errors: dict[str, str] = Field(default={}, description="tag -> why it failed")


# --- process server ---------------------------------------------------------------------------


class RefusedHop(StrEnum):
    AGENT_LINK = "agent -> process server"  # the agent's spool or the link
    CACHE = "process-server cache"
    MT_LINK = "process server -> master target link"
    AGENT_SPOOL = "agent spool"


class RefusedFrame(_Model):
    """A frame refused for its checksum, and how far its healing got (see process_server.py)."""

    pair_id: str
    seq: int
    offset: int = 0
    length: int = 0
    hop: RefusedHop
    refused_at: float
    # The damaged copy was dropped; the agent re-reads the range from its disk (refetch).
    dropped: bool = False
    refetch_seq: int = Field(default=-1, description="sequence of the re-read write, once received")
    # Frames after seq - 1 of unknown ranges were lost (a damaged frame header): the whole pair is
    # compared with the replica; refetch_seq is then the agent's marker that this resync is done.
    resync: bool = False
    healed: bool = False


class ProcessServerStats(_Model):
    cache_used_bytes: int
    cache_capacity_bytes: int
    cache_free_percent: float
    cache_health: CacheHealth
    backlog_bytes: int
    held_bytes: int = Field(default=0, description="of the backlog, frames held in memory (not cached)")
    throughput_bytes_per_s: float
    drain_seconds: float | None = Field(description="backlog / forward throughput; None if idle")
    pairs: int
    refused_frames: list[RefusedFrame] = Field(default=[], description="recent refusals, healed or not")
    refused_peers: list[PeerRefusal] = Field(default=[], description="the newest peers refused")


# --- master target ----------------------------------------------------------------------------


class RelayAssignment(_Model):
    """A pair the process server relays: only from its agent, only to its master target."""

    pair_id: PairId
    agent: str = Field(description="component id of the agent the pair's source is assigned to")
    master_target: str = Field(description="host:port the process server forwards to")
    master_target_id: str = Field(description="its certificate must name this id")
    size: int = Field(ge=0, description="disk size: frames beyond it are refused")


class ProcessServerDesired(_Model):
    pairs: list[RelayAssignment] = Field(default=[], description="the only pairs it accepts")
    discard: list[str] = Field(
        default=[], description="ended pairs (committed or disabled): their cached frames can go"
    )
    revoked: list[str] = _revoked()


class AttachedDisk(_Model):
    pair_id: PairId
    path: Path
    size: int = Field(ge=0)
    process_server: str = Field(default="", description="component id of the only process server accepted")
    # Materialise the disk in place at this recovery point id (None: follow latest). While set,
    # the master target applies no new writes to the pair.
    point: str | None = None
    # Held for a failover whose point is changing: nothing new is applied whatever the point (a
    # process server's leftover backlog for the pair must not move the disk past the failover).
    frozen: bool = False


class PointCopy(_Model):
    """Materialise a pair's recovery point as a new sparse image (test failover); done once per id."""

    request_id: str
    pair_id: str
    point: str
    out_path: Path


class MasterTargetDesired(_Model):
    disks: list[AttachedDisk] = []
    retention_volume: Path | None = None
    retention_seconds: float = 86400.0
    copies: list[PointCopy] = []
    refresh: int = Field(default=0, description="a change asks to rediscover retention volumes now")
    discard: list[str] = Field(
        default=[], description="ended pairs (committed or disabled): their journals and state can go"
    )
    revoked: list[str] = _revoked()


class PointInfo(_Model):
    id: str
    kind: str  # "crash" | "app" | "group" | "latest"
    time: float
    seq: int
    tag: str = ""
    unusable: str = Field(
        default="", description="why the point cannot be restored (damaged journal, a missing write)"
    )


class MasterTargetPairStats(_Model):
    pair_id: str
    applied_seq: int
    last_applied_time: float | None = None
    points: list[PointInfo] = Field(default=[], description="restorable points, oldest first")
    position: str = Field(default="latest", description="point id the disk is materialised at")
    journal_bytes: int = 0
    paused: str = Field(default="", description="error code while applying is paused")
    missing: list[int] = Field(
        default=[], description="sequences of refused writes whose re-read from the source is awaited"
    )
    replica_bytes_read: int = Field(
        default=0, description="bytes of the replica read to answer resyncs (digests it did not keep)"
    )


class RefusedDisk(_Model):
    pair_id: str
    code: str
    message: str


class RetentionVolume(_Model):
    path: Path
    capacity_bytes: int
    free_bytes: int
    fs_type: str
    name: str = ""
    eligible: bool = True
    reason: str = Field(default="", description="why it is not eligible (RP-RET)")
    locked: bool = False
    replication_target: bool = False
    cache_or_install: bool = False


class CopyResult(_Model):
    request_id: str
    ok: bool
    error: str = ""
    bytes_moved: int = 0


# A delta's bounds: far above what a master target changes between two heartbeats (a pair gains
# a point per crash interval and loses thinned ones), so a hostile report stays small to check.
MAX_DELTA_POINTS = 100_000


class PairPointsDelta(_Model):
    """How one pair's point list changed since the acknowledged report (`dataplane.point_delta`)."""

    removed: list[str] = Field(default=[], max_length=MAX_DELTA_POINTS, description="ids of points gone")
    added: list[PointInfo] = Field(
        default=[], max_length=MAX_DELTA_POINTS, description="appended, oldest first"
    )
    replace: list[PointInfo] | None = Field(
        default=None, max_length=MAX_DELTA_POINTS, description="the whole list, when not an append"
    )


class PointsDelta(_Model):
    """The point lists of a report as changes to the report the server acknowledged (`base`)."""

    base: int = Field(ge=0, le=2**63 - 1)
    pairs: dict[PairId, PairPointsDelta] = Field(default={}, max_length=MAX_DELTA_POINTS)


class MasterTargetStats(_Model):
    pairs: list[MasterTargetPairStats] = []
    points_seq: int = Field(
        default=0, ge=0, le=2**63 - 1, description="the version of the point lists this report describes"
    )
    points_delta: PointsDelta | None = Field(
        default=None, description="when present, `pairs[].points` are left out and this carries their changes"
    )
    attached_disks: int = 0
    refused: list[RefusedDisk] = []
    retention_volumes: list[RetentionVolume] = []
    retention_full: bool = False
    copies_done: list[CopyResult] = []
    refused_peers: list[PeerRefusal] = Field(default=[], description="the newest peers refused")
