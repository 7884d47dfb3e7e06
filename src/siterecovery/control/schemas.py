"""Request and response bodies of the REST API (Pydantic v2; they make /openapi.json)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    StrictBool,
    field_validator,
    model_serializer,
)

from siterecovery.dr.fabric_access import FabricSummary
from siterecovery.errors import Problem
from siterecovery.store.states import ComponentKind, Role


def _not_a_bool(value: Any) -> Any:
    # JSON true/false are not numbers, whatever Python thinks (bool is an int subclass).
    if isinstance(value, bool):
        raise ValueError("a number is expected, not true or false")
    return value


# Request numbers: an int, or a float with no fraction (JSON Schema's "integer"), never a bool.
Count = Annotated[int, BeforeValidator(_not_a_bool)]
# Request flags: JSON true or false only (not 0, 1, "yes").
Flag = StrictBool

Name = Field(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9][A-Za-z0-9._ -]*$")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ProblemItem(Strict):
    """One failed rule, as each entry of a problem+json body's `problems` lists it (what-if answers
    carry the same entries). `rule` and `detail` are left out when empty, as `Problem.as_dict` does,
    so clients see one shape whichever answer carried the problem."""

    code: str
    message: str
    remediation: str
    rule: str | None = None
    detail: dict[str, object] | None = None

    @classmethod
    def of(cls, problem: Problem) -> ProblemItem:
        return cls(
            code=problem.code,
            message=problem.message,
            remediation=problem.remediation,
            rule=problem.rule or None,
            detail=dict(problem.detail) or None,
        )

    @model_serializer(mode="wrap")
    def _without_empty(self, handler: SerializerFunctionWrapHandler) -> dict[str, object]:
        out: dict[str, object] = handler(self)
        return {k: v for k, v in out.items() if not (k in ("rule", "detail") and not v)}


class TokenCreate(Strict):
    model_config = ConfigDict(
        json_schema_extra={"examples": [{"name": "auditor", "role": "reader", "expires_in_seconds": 86400}]}
    )

    name: str = Name
    role: Literal[Role.READER, Role.OPERATOR, Role.ADMIN]
    # Omitted: the server's token_days (30 by default). At most ten years; there is no "never".
    expires_in_seconds: Count | None = Field(default=None, ge=60, le=10 * 366 * 86400)


class TokenCreated(BaseModel):
    id: str
    name: str
    role: Role
    token: str
    expires_at: float | None


class TokenOut(BaseModel):
    id: str
    name: str
    role: Role
    created_at: float
    expires_at: float | None
    revoked: bool
    expired: bool


class Registration(Strict):
    passphrase: str = Field(min_length=1, max_length=500)
    kind: Literal[ComponentKind.AGENT, ComponentKind.PROCESS, ComponentKind.MASTER_TARGET]
    # Agents are named "<site>/<machine>": a failed-over machine keeps its name in the cloud.
    name: str = Field(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9][A-Za-z0-9._ /-]*$")
    site: str = Field(default="onprem", max_length=100)
    os_type: Literal["linux", "windows"] | None = None
    address: str | None = Field(default=None, max_length=300)
    machine: str | None = Field(default=None, max_length=200)


class Registered(BaseModel):
    id: str
    token: str
    cert_pem: str
    key_pem: str
    ca_pem: str


class Heartbeat(Strict):
    stats: dict[str, Any] = Field(default_factory=dict)
    # The component's data listener as it is now (it may move across restarts).
    address: str | None = Field(default=None, max_length=300)
    # The version of the desired state the component holds (from its last reply), if any.
    desired_version: str | None = Field(default=None, max_length=64)


class HeartbeatReply(BaseModel):
    # None when the component already holds this version (it sent it as `desired_version`).
    desired: dict[str, Any] | None
    desired_version: str = ""
    server_time: float
    # A master target's point lists: the version the server now holds (the next report's delta
    # base), or a request to send the full lists (`dataplane.point_delta`).
    points_seq: int | None = None
    points_resync: bool = False


class ServerOut(BaseModel):
    id: str
    kind: ComponentKind
    name: str
    site: str
    os_type: str | None
    address: str
    machine: str
    health: str
    connected: bool
    heartbeat_age_seconds: float | None
    registered_at: float
    stats: dict[str, Any]


class PolicyCreate(Strict):
    model_config = ConfigDict(json_schema_extra={"examples": [{"name": "gold", "rpo_threshold_minutes": 30}]})

    name: str = Name
    rpo_threshold_minutes: Count = Field(default=60, ge=1, le=1440)
    retention_hours: Count = Field(default=24, ge=1, le=720)
    app_consistent_frequency_minutes: Count = Field(default=60, ge=0, le=720)
    crash_consistent_frequency_seconds: Count = Field(default=5, ge=1, le=3600)


class PolicyUpdate(Strict):
    rpo_threshold_minutes: Count | None = Field(default=None, ge=1, le=1440)
    retention_hours: Count | None = Field(default=None, ge=1, le=720)
    app_consistent_frequency_minutes: Count | None = Field(default=None, ge=0, le=720)
    crash_consistent_frequency_seconds: Count | None = Field(default=None, ge=1, le=3600)


class PolicyOut(BaseModel):
    id: str
    name: str
    kind: str
    rpo_threshold_minutes: float
    retention_hours: float
    app_consistent_frequency_minutes: float
    crash_consistent_frequency_seconds: int
    editable: bool
    failback_policy_id: str | None
    forward_policy_id: str | None
    associated_server_id: str | None


class PlanAction(Strict):
    kind: Literal["manual", "script"]
    name: str = Name
    instructions: str = Field(default="", max_length=2000)
    command: str = Field(default="", max_length=2000)
    timeout_seconds: Count = Field(default=600, ge=1, le=86400)


class PlanGroup(Strict):
    items: list[str] = Field(default_factory=list)
    actions_after: list[PlanAction] = Field(default_factory=list)


class PlanCreate(Strict):
    name: str = Name
    groups: list[PlanGroup] = Field(min_length=1, max_length=20)


class PlanOut(BaseModel):
    id: str
    name: str
    groups: list[PlanGroup]


class GroupCreate(Strict):
    name: str = Name


class GroupOut(BaseModel):
    id: str
    name: str
    items: list[str]


class TaskOut(BaseModel):
    ordinal: int
    name: str
    action: str
    state: str
    percent: float
    bytes_done: int
    bytes_total: int
    message: str
    attempts: int
    error: dict[str, Any]
    started_at: float | None
    ended_at: float | None


class JobOut(BaseModel):
    id: str
    kind: str
    target_type: str
    target_id: str
    target_name: str
    state: str
    percent: float
    params: dict[str, Any]
    result: dict[str, Any]
    error: dict[str, Any]
    created_at: float
    started_at: float | None
    ended_at: float | None
    tasks: list[TaskOut]


class JobStarted(BaseModel):
    job_id: str


class EventOut(BaseModel):
    id: int
    time: float
    severity: str
    alert: bool
    active: bool
    code: str
    message: str
    object_type: str
    object_id: str


class LabConnection(Strict):
    """Where a lab fabric lives: a folder on the configuration server's host."""

    # No NUL (the OS refuses it), and within what a file system accepts (PATH_MAX, NAME_MAX).
    path: str = Field(min_length=1, max_length=4096, pattern=r"^[^\x00]+$")
    site: str = Field(default="", max_length=100)

    @field_validator("path")
    @classmethod
    def _components_fit(cls, value: str) -> str:
        if any(len(part.encode()) > 255 for part in value.split("/")):
            raise ValueError("each path component must be at most 255 bytes")
        return value


class VSphereConnection(Strict):
    """How to reach a vCenter or ESXi host; the password travels separately, as the secret."""

    host: str = Field(min_length=1, max_length=253, pattern=r"^[A-Za-z0-9._:\[\]-]+$")
    port: Count = Field(default=443, ge=1, le=65535)
    user: str = Field(min_length=1, max_length=200)
    insecure: Flag = False
    datacenter: str | None = Field(default=None, max_length=200)


ENDPOINT = r"^(https://[A-Za-z0-9.:-]+/?)?$"  # an https origin (host and port), or empty


class AzureConnection(Strict):
    """An Azure resource group as a recovery site; the client secret travels separately.

    Azure's own naming rules, so that no value can steer a request elsewhere: the storage account
    becomes a host name (https://<account>.blob.core.windows.net). The endpoints of another cloud
    (a sovereign cloud, an Azure Stack Hub) are whole https origins, given by an operator."""

    subscription: str = Field(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9-]+$")
    resource_group: str = Field(min_length=1, max_length=90, pattern=r"^[-\w.()]+$")
    location: str = Field(min_length=1, max_length=50, pattern=r"^[A-Za-z0-9]+$")
    storage_account: str = Field(min_length=3, max_length=24, pattern=r"^[a-z0-9]+$")
    subnet_id: str = Field(min_length=1, max_length=1000, pattern=r"^/subscriptions/[^\x00]+$")
    tenant: str = Field(default="", max_length=100, pattern=r"^[A-Za-z0-9.-]*$")
    client_id: str = Field(default="", max_length=100, pattern=r"^[A-Za-z0-9-]*$")
    vm_size: str = Field(default="", max_length=100, pattern=r"^[A-Za-z0-9_]*$")
    replica_container: str = Field(default="", max_length=63, pattern=r"^[a-z0-9-]*$")
    # How long failback's read access (SAS) to a disk or snapshot lasts; 0: 4 hours. Its bounds are
    # a prerequisite (AZ-SAS), listed with the others at enable, not refused here.
    sas_seconds: Count = Field(default=0, ge=0, le=2**32 - 1)
    arm_endpoint: str = Field(default="", max_length=300, pattern=ENDPOINT)
    authority_host: str = Field(default="", max_length=300, pattern=ENDPOINT)
    # The replica account's blob endpoint when it is not <account>.blob.core.windows.net; http only
    # for a storage emulator on loopback (the account's key never travels: ARM reads the blob).
    blob_endpoint: str = Field(
        default="",
        max_length=300,
        pattern=r"^(https://[A-Za-z0-9.:-]+(/[A-Za-z0-9]+)?|http://127\.0\.0\.1:[0-9]+/[a-z0-9]+)?$",
    )


class LibvirtConnection(Strict):
    """A libvirt host by its URI (qemu:///system, qemu+ssh://user@host/system); its credentials are
    the URI's own (SSH keys, SASL, TLS certificates on the configuration server's host)."""

    uri: str = Field(min_length=1, max_length=1000, pattern=r"^[a-z0-9]+(\+[a-z0-9]+)?://[^\x00\s]*$")
    domain_type: Literal["", "kvm", "qemu"] = ""


class FabricCreate(Strict):
    name: str = Name
    kind: Literal["lab", "vsphere", "azure", "libvirt"]
    site: str = Field(default="", max_length=100)
    connection: dict[str, Any] = Field(default_factory=dict)
    secret: str = Field(default="", max_length=1000)


class FabricCredentials(Strict):
    connection: dict[str, Any] | None = None
    secret: str = Field(default="", max_length=1000)


class ServerInfo(BaseModel):
    """The configuration server's identity (kept across backup/restore), version and clock."""

    id: str
    name: str
    advertised_address: str
    version: str
    time: float


class RecoveryPointOut(BaseModel):
    """A point every disk of an item has (`latest` always first); `disks` maps pair id to point id."""

    id: str
    kind: str
    time: float
    time_utc: str
    disks: dict[str, str]
    unusable: str


class FabricOut(BaseModel):
    id: str
    name: str
    kind: str
    site: str
    connection: dict[str, Any]
    last_discovery_at: float | None
    discovery_error: str
    summary: FabricSummary
