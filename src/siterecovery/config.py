"""Configuration in one place: typed defaults, overridable by a TOML file and the environment.

Precedence (lowest first): defaults, `$SITERECOVERY_HOME/config.toml`, `SITERECOVERY_*`
environment variables, command-line flags. `siterecovery config show` prints the result.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path


def default_home() -> Path:
    env = os.environ.get("SITERECOVERY_HOME")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".local" / "share" / "siterecovery"


@dataclass(frozen=True)
class ServerConfig:
    state_dir: Path
    database_url: str
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
    # Wrong registration passphrases one source address may give per minute before a 429.
    passphrase_failures_per_minute: int = 5
    # Lifetime of component certificates; components renew them when a third of it is left.
    component_cert_days: float = 7.0

    @property
    def host(self) -> str:
        return self.listen.rsplit(":", 1)[0]

    @property
    def port(self) -> int:
        return int(self.listen.rsplit(":", 1)[1])

    def as_dict(self) -> dict[str, object]:
        out = asdict(self)
        out["state_dir"] = str(self.state_dir)
        return out


_ENV_PREFIX = "SITERECOVERY_"


def _coerce(kind: object, raw: object) -> object:
    if kind in (float, "float"):
        return float(raw)  # type: ignore[arg-type]
    if kind in (int, "int"):
        return int(str(raw))
    if kind in (bool, "bool"):
        return str(raw).lower() in ("1", "true", "yes", "on")
    if kind in (Path, "Path"):
        return Path(str(raw)).expanduser()
    return str(raw)


def load_server_config(
    state_dir: Path | None = None,
    database_url: str | None = None,
    listen: str | None = None,
) -> ServerConfig:
    home = (state_dir or default_home()).expanduser().resolve()
    cfg = ServerConfig(state_dir=home, database_url=f"sqlite:///{home / 'siterecovery.db'}")
    overrides: dict[str, object] = {}
    cfg_file = home / "config.toml"
    if cfg_file.exists():
        overrides.update(tomllib.loads(cfg_file.read_text()).get("server", {}))
    for f in fields(cfg):
        env = os.environ.get(_ENV_PREFIX + f.name.upper())
        if env is not None and f.name != "state_dir":
            overrides[f.name] = env
    typed = {f.name: _coerce(f.type, overrides[f.name]) for f in fields(cfg) if f.name in overrides}
    cfg = replace(cfg, **typed)  # type: ignore[arg-type]
    if database_url:
        cfg = replace(cfg, database_url=database_url)
    if listen:
        cfg = replace(cfg, listen=listen)
    return cfg
