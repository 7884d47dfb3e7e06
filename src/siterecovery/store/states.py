"""Enumerations of the control plane's states (stored as their string values)."""

from __future__ import annotations

from enum import StrEnum


class Role(StrEnum):
    READER = "reader"
    OPERATOR = "operator"
    ADMIN = "admin"
    COMPONENT = "component"


class ComponentKind(StrEnum):
    CONFIGURATION = "configuration-server"
    PROCESS = "process-server"
    MASTER_TARGET = "master-target"
    AGENT = "agent"


class Health(StrEnum):
    NORMAL = "normal"
    WARNING = "warning"
    CRITICAL = "critical"


class Direction(StrEnum):
    FORWARD = "onprem-to-cloud"
    FAILBACK = "cloud-to-onprem"


class ProtectionState(StrEnum):
    ENABLING = "enabling"
    INITIAL_SYNC = "initial-sync"
    PROTECTED = "protected"
    RESYNC_REQUIRED = "resync-required"
    FAILOVER_IN_PROGRESS = "failover-in-progress"
    FAILED_OVER = "failed-over"  # not yet committed; the point can still change
    FAILOVER_COMMITTED = "failover-committed"
    REPROTECTING = "reprotecting"
    DISABLED = "disabled"
    FAILED = "failed"


class JobState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    PAUSED = "paused"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        return self in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED)


class TaskState(StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    WAITING = "waiting"  # a manual action waits for `jobs resume`
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    SKIPPED = "skipped"
    CANCELLED = "cancelled"


class Severity(StrEnum):
    INFO = "info"
    WARNING = "warning"
    CRITICAL = "critical"


class PolicyKind(StrEnum):
    REPLICATION = "replication"
    FAILBACK = "failback"


class FabricKind(StrEnum):
    LAB = "lab"
    VSPHERE = "vsphere"
    AZURE = "azure"
    LIBVIRT = "libvirt"
