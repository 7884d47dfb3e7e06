"""Desired state and statistics of data-plane components: the heartbeat contract's payloads.

A component heartbeats `{"stats": <its Stats model>}` to the configuration server and receives
`{"desired": <its Desired model>}`; it reconciles toward `desired` idempotently. The same Desired
models are read from an `--assignments FILE` (JSON) when a data plane runs without a configuration
server. The configuration server stores and serves exactly these models.
"""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


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

    pair_id: str
    disk: str = Field(description="disk label; also the NBD export name")
    image: Path | None = Field(default=None, description="image path; else from the agent's --disk")
    process_server: str = Field(description="host:port of the process server's data listener")
    master_target: str = Field(description="host:port the process server forwards to")
    sync_mode: SyncMode = SyncMode.FULL
    # Raising the generation asks for a new initial sync of the pair (e.g. after reprotect).
    generation: int = 1
    paused: bool = False


class AgentDesired(_Model):
    replications: list[DiskReplication] = []


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


class AgentStats(_Model):
    pairs: list[PairStats] = []


# --- process server ---------------------------------------------------------------------------


class ProcessServerStats(_Model):
    cache_used_bytes: int
    cache_capacity_bytes: int
    cache_free_percent: float
    cache_health: CacheHealth
    backlog_bytes: int
    throughput_bytes_per_s: float
    drain_seconds: float | None = Field(description="backlog / forward throughput; None if idle")
    pairs: int


# --- master target ----------------------------------------------------------------------------


class AttachedDisk(_Model):
    pair_id: str
    path: Path
    size: int


class MasterTargetDesired(_Model):
    disks: list[AttachedDisk] = []
    retention_volume: Path | None = None


class MasterTargetPairStats(_Model):
    pair_id: str
    applied_seq: int
    last_applied_time: float | None = None


class RefusedDisk(_Model):
    pair_id: str
    code: str
    message: str


class RetentionVolume(_Model):
    path: Path
    capacity_bytes: int
    free_bytes: int
    fs_type: str


class MasterTargetStats(_Model):
    pairs: list[MasterTargetPairStats] = []
    attached_disks: int = 0
    refused: list[RefusedDisk] = []
    retention_volumes: list[RetentionVolume] = []
