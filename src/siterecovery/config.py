"""Configuration of every service: one pydantic-settings object each, and where each value came from.

The configuration server (`ServerConfig`), the agent (`AgentSettings`), the process server
(`ProcessServerSettings`) and the master target (`MasterTargetSettings`) each read their settings
from, highest first: command-line flags, `SITERECOVERY_<NAME>` environment variables, the service's
table of a TOML file (`[server]`, `[agent]`, `[process-server]`, `[master-target]`), then defaults.
The file is `--config FILE`, else `$SITERECOVERY_CONFIG`, else `config.toml` in the server's state
directory (`$SITERECOVERY_HOME`, default ~/.local/share/siterecovery).

`load_settings` reads the sources itself, when a service starts and never at import time, so it can
record where every value came from; `siterecovery config show` prints that, secrets masked. A bad
value or an unknown key is refused with `config-invalid`, naming the setting and its source.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any, ClassVar, Generic, TypeVar

from pydantic import Field, SecretStr, ValidationError, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    InitSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from siterecovery.errors import Problem, SiteRecoveryError, Status

ENV_PREFIX = "SITERECOVERY_"
CONFIG_FILE_ENV = "SITERECOVERY_CONFIG"


def default_home() -> Path:
    env = os.environ.get("SITERECOVERY_HOME")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".local" / "share" / "siterecovery"


class LogFormat(StrEnum):
    TEXT = "text"
    JSON = "json"  # one JSON object per line (docs/operations.md)


class LogLevel(StrEnum):
    DEBUG = "DEBUG"
    INFO = "INFO"
    WARNING = "WARNING"
    ERROR = "ERROR"


class Service(StrEnum):
    """A service with settings; the value is its table in the configuration file."""

    SERVER = "server"
    AGENT = "agent"
    PROCESS_SERVER = "process-server"
    MASTER_TARGET = "master-target"


class ServiceSettings(BaseSettings):
    """What every service has: its logging."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, frozen=True, extra="forbid")
    SERVICE: ClassVar[Service]

    # WARNING: what the services printed before the setting existed; INFO adds lifecycle lines.
    log_level: LogLevel = LogLevel.WARNING
    log_format: LogFormat = LogFormat.TEXT

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # `load_settings` reads flags, environment and file itself (to record each value's origin)
        # and passes the merged values in; construction must not read the environment again.
        return (init_settings,)


class ServerConfig(ServiceSettings):
    SERVICE: ClassVar[Service] = Service.SERVER

    state_dir: Path = Path()  # replaced by `load_settings`: the flag, else $SITERECOVERY_HOME
    # SQLAlchemy URL; empty means SQLite in the state directory.
    database_url: str = ""
    listen: str = "127.0.0.1:8443"
    # Seconds without a heartbeat after which a component counts as disconnected (RP-PS, RP-REACH).
    heartbeat_timeout: float = 30.0
    # Crash-consistent recovery point interval in seconds (issue 5: default 5 s).
    crash_point_interval: float = 5.0
    # Delay before a failed-over machine's agent registers again (AG-1; up to 15 min for real).
    agent_registration_delay: float = 900.0
    tls: bool = False
    # Extra names (DNS or IP, comma-separated) for the HTTPS certificate: the ones components use.
    tls_names: str = ""
    # Largest request body the API reads (bytes); a larger one is refused with 413 unread.
    max_body_bytes: int = 16 * 1024 * 1024
    # Lifetime of a new user token unless `tokens create --expires-in` says otherwise.
    token_days: float = 30.0
    # Seconds a verified token is trusted without reading it again (revokes here void it at once;
    # another server process's revoke or expiry edits are seen within this time). 0: every request.
    token_cache_seconds: float = 5.0
    # Wrong registration passphrases one source address may give per minute before a 429.
    passphrase_failures_per_minute: int = 5
    # Lifetime of component certificates; components renew them when a third of it is left.
    component_cert_days: float = 7.0
    # Seconds an idle HTTP connection stays open (docs/operations.md, "Connections"). Above the
    # components' own keep-alive (`COMPONENT_KEEP_ALIVE`), itself above the longest idle interval,
    # so an idle component sends every heartbeat on the one connection it keeps: no accept, no new
    # parser, no TLS handshake per heartbeat.
    keep_alive_seconds: float = Field(default=75.0, gt=0)

    @model_validator(mode="after")
    def _sqlite_in_state_dir(self) -> ServerConfig:
        if not self.database_url:
            object.__setattr__(self, "database_url", f"sqlite:///{self.state_dir / 'siterecovery.db'}")
        return self

    @property
    def host(self) -> str:
        return self.listen.rsplit(":", 1)[0]

    @property
    def port(self) -> int:
        return int(self.listen.rsplit(":", 1)[1])

    def as_dict(self) -> dict[str, object]:
        return self.model_dump(mode="json")


# Idle heartbeat intervals by default (docs/operations.md, "Heartbeat intervals").
AGENT_INTERVAL = 10.0
SERVER_INTERVAL = 5.0  # process servers and master targets
# Seconds a component keeps its idle connection to the configuration server: longer than any idle
# interval a server honours (`control.admission.LONGEST`, 60 s) and shorter than the server's
# `keep_alive_seconds` (75 s), so the component, not the server, closes an idle connection and never
# sends on one the server is closing.
COMPONENT_KEEP_ALIVE = 65.0


def idle_interval(seconds: float) -> float:
    """A component's default idle interval; $SITERECOVERY_DEFAULT_INTERVAL replaces it for every
    component (the tests keep the 2 s of before, tests/conftest.py)."""
    return float(os.environ.get("SITERECOVERY_DEFAULT_INTERVAL", seconds))


class ComponentSettings(ServiceSettings):
    """What the data-plane components share: how they reach the configuration server."""

    # Configuration server URL; without one the component runs from --assignments.
    server: str | None = None
    # CA the configuration server's HTTPS certificate must chain to (else trust on first use).
    ca_file: Path | None = None
    passphrase_file: Path | None = None
    site: str = "onprem"
    # Seconds between heartbeats (and reconciliations) while idle; 2 s right after a change
    # (docs/operations.md, "Heartbeat intervals").
    interval: float = Field(default_factory=lambda: idle_interval(SERVER_INTERVAL))
    # Desired state from this JSON file instead of the configuration server.
    assignments: Path | None = None


class AgentSettings(ComponentSettings):
    SERVICE: ClassVar[Service] = Service.AGENT

    interval: float = Field(default_factory=lambda: idle_interval(AGENT_INTERVAL))

    machine: str | None = None  # required: the protected machine's name
    disks: list[str] = []  # LABEL=PATH of each local disk
    nbd_unix_dir: Path | None = None
    nbd_listen: str | None = None
    state_dir: Path = Path("agent-state")
    # Bytes of captured writes spooled per disk before capture falls back to a bitmap (dataplane/
    # replica.py DEFAULT_SPOOL_LIMIT; a test keeps the two equal).
    spool_limit: int = 1 << 30
    drain_timeout: float = 30.0
    # Seconds after start before registering (AG-1).
    registration_delay: float = 0.0
    freeze_hook: str | None = None
    thaw_hook: str | None = None


class ProcessServerSettings(ComponentSettings):
    SERVICE: ClassVar[Service] = Service.PROCESS_SERVER

    cache_dir: Path | None = None  # required
    listen: str = "127.0.0.1:9443"
    name: str = "process-server"
    machine: str | None = None
    state_dir: Path | None = None  # default: the cache dir


class MasterTargetSettings(ComponentSettings):
    SERVICE: ClassVar[Service] = Service.MASTER_TARGET

    os_type: str | None = None  # required: linux or windows (MT-2); the flag is --os
    retention_volume: Path | None = None
    volumes: list[Path] = []
    retention_quota: int | None = None
    page_blob_container: str | None = None
    # The storage account's connection string for page blobs: $SITERECOVERY_AZURE_STORAGE or the
    # file, never a flag (a command line is visible to every user of the machine).
    azure_storage: SecretStr | None = None
    datastores: list[str] = []  # NAME=DIR
    listen: str = "127.0.0.1:9444"
    advertise: str | None = None
    name: str = "master-target"
    machine: str | None = None
    state_dir: Path = Path("master-target-state")


SETTINGS: dict[Service, type[ServiceSettings]] = {
    Service.SERVER: ServerConfig,
    Service.AGENT: AgentSettings,
    Service.PROCESS_SERVER: ProcessServerSettings,
    Service.MASTER_TARGET: MasterTargetSettings,
}

S = TypeVar("S", bound=ServiceSettings)


class Origin(StrEnum):
    FLAG = "flag"
    ENV = "env"
    FILE = "file"
    DEFAULT = "default"


@dataclass(frozen=True)
class Setting:
    """One effective setting as `config show` prints it."""

    name: str
    value: object  # secrets already masked
    origin: Origin
    where: str  # the variable or the file, for env and file

    @property
    def source(self) -> str:
        return f"{self.origin} {self.where}".strip()


@dataclass(frozen=True)
class Effective(Generic[S]):
    settings: S
    origins: dict[str, tuple[Origin, str]]

    def rows(self) -> list[Setting]:
        dumped = self.settings.model_dump(mode="json")
        out = []
        for name in type(self.settings).model_fields:
            origin, where = self.origins.get(name, (Origin.DEFAULT, ""))
            out.append(Setting(name, _masked(getattr(self.settings, name), dumped[name]), origin, where))
        return out


_URL_PASSWORD = re.compile(r"(://[^:/@]*:)[^@]*@")
MASK = "********"


def _masked(value: object, dumped: object) -> object:
    if isinstance(value, SecretStr):
        return MASK if value.get_secret_value() else ""
    if isinstance(dumped, str):
        return _URL_PASSWORD.sub(rf"\g<1>{MASK}@", dumped)
    return dumped


class TomlTable(PydanticBaseSettingsSource):
    """The service's table of the TOML configuration file (absent file: no values)."""

    def __init__(self, settings_cls: type[BaseSettings], path: Path | None, table: str) -> None:
        super().__init__(settings_cls)
        self.path = path
        self.values: dict[str, Any] = {}
        if path is None or not path.exists():
            return
        try:
            data = tomllib.loads(path.read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise _invalid(f"Configuration file {path} cannot be read: {exc}") from exc
        section = data.get(table, {})
        if not isinstance(section, dict):
            raise _invalid(f"[{table}] in {path} is not a table")
        self.values = {k.replace("-", "_"): v for k, v in section.items()}

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return self.values.get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return dict(self.values)


def _invalid(message: str) -> SiteRecoveryError:
    return SiteRecoveryError(
        Problem(
            "config-invalid",
            message,
            "Fix the flag, the SITERECOVERY_* variable or the configuration file; "
            "`siterecovery config show --service NAME` prints what is in effect.",
        ),
        Status.UNPROCESSABLE,
    )


def config_file(explicit: Path | None, home: Path | None = None) -> Path:
    """The configuration file: the flag, else $SITERECOVERY_CONFIG, else config.toml in the home."""
    if explicit is not None:
        return explicit.expanduser()
    env = os.environ.get(CONFIG_FILE_ENV)
    if env:
        return Path(env).expanduser()
    return (home or default_home()).expanduser() / "config.toml"


def load_settings(
    cls: type[S], flags: Mapping[str, object] | None = None, file: Path | None = None
) -> Effective[S]:
    """Settings of `cls` from flags (None = not given) > environment > `file`'s table > defaults."""
    given = {k: v for k, v in (flags or {}).items() if v is not None}
    env = EnvSettingsSource(cls, env_prefix=ENV_PREFIX, case_sensitive=False)()
    home_origin: tuple[Origin, str] | None = None
    if cls is ServerConfig:
        # The server's state directory defaults to $SITERECOVERY_HOME, and its file lives there
        # (so the file cannot move it).
        if "state_dir" not in given and "state_dir" not in env:
            given["state_dir"] = default_home()
            home_origin = (Origin.DEFAULT, "$SITERECOVERY_HOME or ~/.local/share/siterecovery")
        home = Path(str(given.get("state_dir") or env["state_dir"])).expanduser().resolve()
        given["state_dir"] = home
        file = config_file(file, home)
    else:
        file = config_file(file)
    table = TomlTable(cls, file, cls.SERVICE.value)
    if cls is ServerConfig:
        table.values.pop("state_dir", None)
    layers: list[tuple[Origin, str, dict[str, Any]]] = [
        (Origin.FILE, f"{file} [{cls.SERVICE.value}]", table()),
        (Origin.ENV, "", env),
        (Origin.FLAG, "", InitSettingsSource(cls, init_kwargs=given)()),
    ]
    merged: dict[str, Any] = {}
    origins: dict[str, tuple[Origin, str]] = {}
    for origin, where, values in layers:  # lowest first: a later layer overrides
        for name, value in values.items():
            merged[name] = value
            origins[name] = (origin, f"{ENV_PREFIX}{name.upper()}" if origin is Origin.ENV else where)
    if home_origin is not None:
        origins["state_dir"] = home_origin
    try:
        settings = cls(**merged)
    except ValidationError as exc:
        first = exc.errors()[0]
        name = str(first["loc"][0]) if first["loc"] else "?"
        origin, where = origins.get(name, (Origin.DEFAULT, ""))
        raise _invalid(f"Setting {name} ({f'{origin} {where}'.strip()}): {first['msg']}") from exc
    return Effective(settings, origins)


def load_server_config(
    state_dir: Path | None = None,
    database_url: str | None = None,
    listen: str | None = None,
) -> ServerConfig:
    """The server's settings with these flags (the shape the server's callers and tests use)."""
    flags = {"state_dir": state_dir, "database_url": database_url, "listen": listen}
    return load_settings(ServerConfig, flags).settings
