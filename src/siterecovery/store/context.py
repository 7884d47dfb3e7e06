"""The configuration server's process-wide state: configuration, database, CA, secrets.

One `ControlPlane` per server process (DBOS, which runs the jobs, is process-wide too). It is
created once at start-up, which also applies migrations and makes the server's identity, its
certificate authority, its registration passphrase and the first admin token on a fresh state
directory.
"""

from __future__ import annotations

import os
import secrets
import socket
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import select

from siterecovery.config import ServerConfig
from siterecovery.pki import CertificateAuthority
from siterecovery.store import migrate
from siterecovery.store.database import Database
from siterecovery.store.models import Component, ServerIdentity, new_id, now
from siterecovery.store.secrets import SecretBox
from siterecovery.store.states import ComponentKind, Role
from siterecovery.store.tokens import TokenCache, create_token


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text + "\n")


@dataclass
class ControlPlane:
    config: ServerConfig
    db: Database
    ca: CertificateAuthority
    box: SecretBox
    server_id: str
    # Set only on the start that created the admin token: it is shown once, never stored.
    initial_admin_token: str | None = None
    tokens: TokenCache = field(init=False)  # verified API tokens, remembered briefly (`store.tokens`)

    def __post_init__(self) -> None:
        self.tokens = TokenCache(self.config.token_cache_seconds)

    @property
    def passphrase_file(self) -> Path:
        return self.config.state_dir / "passphrase"

    def passphrase(self) -> str:
        return self.passphrase_file.read_text().strip()

    def rotate_passphrase(self) -> str:
        value = secrets.token_urlsafe(18)
        _write_private(self.passphrase_file, value)
        return value

    def check_passphrase(self, given: str) -> bool:
        return secrets.compare_digest(given.strip(), self.passphrase())


_CURRENT: ControlPlane | None = None


def current() -> ControlPlane:
    if _CURRENT is None:
        raise RuntimeError("the configuration server is not initialised in this process")
    return _CURRENT


def open_control_plane(config: ServerConfig) -> ControlPlane:
    """Open (creating on first start) the state directory and make it this process's control plane."""
    global _CURRENT
    state = config.state_dir
    state.mkdir(parents=True, exist_ok=True)
    db = Database(config.database_url)
    migrate.upgrade(db)
    ca = CertificateAuthority.load_or_create(state / "pki", "siterecovery CA")
    box = SecretBox.load_or_create(state / "secret.key")
    cp = ControlPlane(config=config, db=db, ca=ca, box=box, server_id="")
    if not cp.passphrase_file.exists():
        cp.rotate_passphrase()
    with db.session() as s:
        ident = s.scalar(select(ServerIdentity))
        if ident is None:
            ident = ServerIdentity(
                id=new_id("cs"), name=socket.gethostname(), advertised_address=config.listen
            )
            s.add(ident)
            s.add(
                Component(
                    id=ident.id,
                    kind=ComponentKind.CONFIGURATION,
                    name=ident.name,
                    site="onprem",
                    address=config.listen,
                    last_heartbeat=now(),
                )
            )
            cp.initial_admin_token = create_token(s, "initial admin", Role.ADMIN)
        cp.server_id = ident.id
    _CURRENT = cp
    return cp
