"""Database schema (SQLAlchemy 2); the engine and session factory are in `store.database`.

SQLite file by default (embedded), PostgreSQL by URL. The schema is created and upgraded by the
Alembic migrations in `migrations/`, applied when the server starts; models here are the single
definition both the API and the migrations use.
"""

from __future__ import annotations

import time
import uuid
from enum import StrEnum
from typing import Any, TypeVar

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    TypeDecorator,
    select,
    text,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from siterecovery.store.states import (
    ComponentKind,
    Direction,
    FabricKind,
    Health,
    JobState,
    PolicyKind,
    ProtectionState,
    Role,
    Severity,
    TaskState,
)

T = TypeVar("T", bound="Base")
E = TypeVar("E", bound=StrEnum)


class EnumText(TypeDecorator[E]):
    """A state column: stored as the enum's string value (the very strings stored before the
    states were typed, so no data migration), read back as the enum.

    A string given to a query is passed through as it is: a filter on an unknown state matches
    nothing instead of failing the request.
    """

    impl = String
    cache_ok = True

    def __init__(self, enum: type[E], length: int) -> None:
        super().__init__(length)
        self.enum = enum

    def process_bind_param(self, value: E | str | None, dialect: Dialect) -> str | None:
        return None if value is None else str(value)

    def process_result_value(self, value: str | None, dialect: Dialect) -> E | None:
        return None if value is None else self.enum(value)


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def now() -> float:
    return time.time()


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON}


class ServerIdentity(Base):
    """The configuration server's identity; kept across backup/restore (CS-3)."""

    __tablename__ = "server_identity"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    advertised_address: Mapped[str] = mapped_column(String(300))
    created_at: Mapped[float] = mapped_column(Float, default=now)


class Token(Base):
    __tablename__ = "tokens"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    role: Mapped[Role] = mapped_column(EnumText(Role, 20))
    secret_hash: Mapped[str] = mapped_column(String(128), unique=True, index=True)
    component_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    created_at: Mapped[float] = mapped_column(Float, default=now)
    revoked: Mapped[bool] = mapped_column(Boolean, default=False)
    # Unix time after which the token is refused; None: it does not expire (component tokens,
    # which are replaced on re-registration).
    expires_at: Mapped[float | None] = mapped_column(Float, nullable=True)


class Component(Base):
    """A registered server: configuration server, process server, master target or agent."""

    __tablename__ = "components"
    # The RPO monitor and registration look agents up by kind and name.
    __table_args__ = (Index("ix_components_kind_name", "kind", "name"),)
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    kind: Mapped[ComponentKind] = mapped_column(EnumText(ComponentKind, 30), index=True)
    name: Mapped[str] = mapped_column(String(200))
    site: Mapped[str] = mapped_column(String(100), default="")
    os_type: Mapped[str | None] = mapped_column(String(20), nullable=True)
    address: Mapped[str] = mapped_column(String(300), default="")
    machine: Mapped[str] = mapped_column(String(200), default="")
    registered_at: Mapped[float] = mapped_column(Float, default=now)
    last_heartbeat: Mapped[float | None] = mapped_column(Float, nullable=True)
    health: Mapped[Health] = mapped_column(EnumText(Health, 20), default=Health.NORMAL)
    stats: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    desired: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)


class MasterTargetPoint(Base):
    """One recovery point a master target lists for a pair (its report's `pairs[].points`).

    Kept as rows, not inside `components.stats`, so a heartbeat whose point lists did not change
    (a delta without changes) writes no point at all, and one that did writes only the points
    added and removed. `position` keeps the order the master target lists them in.
    """

    __tablename__ = "mt_points"
    # Ids are the master target's and not checked for uniqueness (a delta removes every point
    # with a removed id, as `point_delta.apply` does), so the key is the position, not the id.
    # The RPO monitor reads the unusable points of every master target once per pass: few rows,
    # found through a partial index rather than a scan of every point.
    __table_args__ = (
        Index("ix_mt_points_id", "master_target_id", "pair_id", "point_id"),
        Index(
            "ix_mt_points_unusable",
            "master_target_id",
            "pair_id",
            "position",
            sqlite_where=text("unusable != ''"),
            postgresql_where=text("unusable != ''"),
        ),
    )
    master_target_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    pair_id: Mapped[str] = mapped_column(String(200), primary_key=True)
    position: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    point_id: Mapped[str] = mapped_column(Text)
    kind: Mapped[str] = mapped_column(Text)
    time: Mapped[float] = mapped_column(Float)
    seq: Mapped[int] = mapped_column(BigInteger)
    tag: Mapped[str] = mapped_column(Text, default="")
    unusable: Mapped[str] = mapped_column(Text, default="")


def heartbeat_age(row: Component) -> float | None:
    return None if row.last_heartbeat is None else max(0.0, now() - row.last_heartbeat)


class DesiredEpoch(Base):
    """One row whose value changes with every commit that may change a component's desired state.

    A heartbeat whose component's desired state was computed under the current value skips
    computing it again (`store.desired_epoch`). Random, not a count: a database restored from a
    backup must not reach a value some process cached for another history.
    """

    __tablename__ = "desired_epoch"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    value: Mapped[int] = mapped_column(BigInteger, default=0)


class ComponentCertificate(Base):
    """A certificate the CA issued to a component; revoked when the component is removed.

    Kept until it expires (certificates are short-lived), so the revocation list stays short.
    """

    __tablename__ = "component_certificates"
    serial: Mapped[str] = mapped_column(String(64), primary_key=True)  # hex
    component_id: Mapped[str] = mapped_column(String(64), index=True)
    kind: Mapped[ComponentKind] = mapped_column(EnumText(ComponentKind, 30))
    not_after: Mapped[float] = mapped_column(Float)
    issued_at: Mapped[float] = mapped_column(Float, default=now)
    revoked_at: Mapped[float | None] = mapped_column(Float, nullable=True)


class Fabric(Base):
    __tablename__ = "fabrics"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    kind: Mapped[FabricKind] = mapped_column(EnumText(FabricKind, 20))
    site: Mapped[str] = mapped_column(String(100), default="")
    connection: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    secret_encrypted: Mapped[str] = mapped_column(Text, default="")
    last_discovery_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    discovery_error: Mapped[str] = mapped_column(Text, default="")
    inventory: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)


class Policy(Base):
    __tablename__ = "policies"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    kind: Mapped[PolicyKind] = mapped_column(EnumText(PolicyKind, 20))
    rpo_threshold_seconds: Mapped[int] = mapped_column(Integer)
    retention_seconds: Mapped[int] = mapped_column(Integer)
    app_consistent_frequency_seconds: Mapped[int] = mapped_column(Integer)
    crash_consistent_frequency_seconds: Mapped[int] = mapped_column(Integer, default=5)
    failback_policy_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    forward_policy_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    associated_server_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    editable: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[float] = mapped_column(Float, default=now)


class ReplicationGroup(Base):
    __tablename__ = "replication_groups"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    created_at: Mapped[float] = mapped_column(Float, default=now)


class ReplicatedItem(Base):
    __tablename__ = "replicated_items"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    machine: Mapped[str] = mapped_column(String(200))
    source_fabric_id: Mapped[str] = mapped_column(String(64))
    target_fabric_id: Mapped[str] = mapped_column(String(64))
    direction: Mapped[Direction] = mapped_column(EnumText(Direction, 30))
    state: Mapped[ProtectionState] = mapped_column(EnumText(ProtectionState, 30))
    health: Mapped[Health] = mapped_column(EnumText(Health, 20), default=Health.NORMAL)
    policy_id: Mapped[str] = mapped_column(ForeignKey("policies.id"))
    process_server_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    master_target_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    group_id: Mapped[str | None] = mapped_column(ForeignKey("replication_groups.id"), nullable=True)
    rpo_seconds: Mapped[float | None] = mapped_column(Float, nullable=True)
    details: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    # Bumped by a flush hook whenever `details` changes (store.item_index): readers that keep a
    # parsed copy (the RPO monitor) reload an item's details only when this moved.
    details_rev: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    created_at: Mapped[float] = mapped_column(Float, default=now)
    updated_at: Mapped[float] = mapped_column(Float, default=now)


class ItemComponent(Base):
    """Index: which components an item's desired state concerns (see `store.item_index`).

    `component` is a process server's or master target's id, or `agent:<site>/<machine>` for the
    agent (agents are named by machine). Rewritten whenever an item's details change, so a
    heartbeat reads only its own items instead of every item.
    """

    __tablename__ = "item_components"
    item_id: Mapped[str] = mapped_column(
        ForeignKey("replicated_items.id", ondelete="CASCADE"), primary_key=True
    )
    component: Mapped[str] = mapped_column(String(264), primary_key=True, index=True)


class RecoveryPlan(Base):
    __tablename__ = "recovery_plans"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    # Ordered boot groups: [{"items": [item ids], "actions": [{"kind": "manual"|"script", ...}]}]
    groups: Mapped[list[Any]] = mapped_column(JSON, default=list)
    created_at: Mapped[float] = mapped_column(Float, default=now)


class Job(Base):
    __tablename__ = "jobs"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)  # = DBOS workflow id
    kind: Mapped[str] = mapped_column(String(50), index=True)
    target_type: Mapped[str] = mapped_column(String(30), default="")
    target_id: Mapped[str] = mapped_column(String(64), default="")
    target_name: Mapped[str] = mapped_column(String(200), default="")
    state: Mapped[JobState] = mapped_column(EnumText(JobState, 20), index=True)
    params: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    result: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    error: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[float] = mapped_column(Float, default=now)
    started_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    ended_at: Mapped[float | None] = mapped_column(Float, nullable=True)


class JobTask(Base):
    __tablename__ = "job_tasks"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id"), index=True)
    ordinal: Mapped[int] = mapped_column(Integer)
    name: Mapped[str] = mapped_column(String(200))
    # What runs: a registered task handler name and its JSON arguments (see store.jobs).
    action: Mapped[str] = mapped_column(String(100))
    args: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    state: Mapped[TaskState] = mapped_column(EnumText(TaskState, 20))
    percent: Mapped[float] = mapped_column(Float, default=0.0)
    bytes_done: Mapped[int] = mapped_column(Integer, default=0)
    bytes_total: Mapped[int] = mapped_column(Integer, default=0)
    message: Mapped[str] = mapped_column(Text, default="")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    error: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    # A finished task's outcome, committed with its end state: DBOS records a step's output only
    # after the step returns, so a crash in between would run a finished task again without it.
    result: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    started_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    ended_at: Mapped[float | None] = mapped_column(Float, nullable=True)


class Event(Base):
    """An event (something happened) or an alert (a condition that is active until cleared)."""

    __tablename__ = "events"
    # Alerts are looked up by their object and code (raise/clear), events listed by object.
    __table_args__ = (Index("ix_events_object", "object_type", "object_id", "code"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    time: Mapped[float] = mapped_column(Float, default=now, index=True)
    severity: Mapped[Severity] = mapped_column(EnumText(Severity, 20))
    alert: Mapped[bool] = mapped_column(Boolean, default=False)
    active: Mapped[bool] = mapped_column(Boolean, default=False)
    code: Mapped[str] = mapped_column(String(100))
    message: Mapped[str] = mapped_column(Text)
    object_type: Mapped[str] = mapped_column(String(30), default="")
    object_id: Mapped[str] = mapped_column(String(64), default="")
    cleared_at: Mapped[float | None] = mapped_column(Float, nullable=True)


def by_id_or_name(s: Session, model: type[T], ident: str) -> T | None:
    """The row whose id or (unique) name is `ident`: operators use names, scripts use ids."""
    found = s.get(model, ident)
    if found is not None:
        return found
    name = model.__table__.c["name"]  # every model looked up this way has a unique name column
    row: T | None = s.execute(select(model).where(name == ident)).scalars().first()
    return row
