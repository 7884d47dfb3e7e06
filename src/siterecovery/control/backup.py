"""Backup and restore of the configuration server (CS-3).

A backup is one tar.gz of the state directory's durable content: the database (copied with
SQLite's online backup API, so the server may keep running), the job engine's database, the
certificate authority, the credential key, the registration passphrase and config.toml. A restore
onto a new host keeps the server's identity — its id, CA and the address it advertises — so
registered components keep their certificates and tokens and failback keeps working.
"""

from __future__ import annotations

import io
import json
import sqlite3
import tarfile
import tempfile
import time
from pathlib import Path

from siterecovery import __version__
from siterecovery.config import ServerConfig
from siterecovery.errors import Problem, SiteRecoveryError, Status

_DATABASES = ("siterecovery.db", "jobs.sqlite")
_FILES = ("passphrase", "secret.key", "config.toml")
_DIRS = ("pki",)
MANIFEST = "manifest.json"


def _sqlite_copy(source: Path, target: Path) -> None:
    src = sqlite3.connect(f"file:{source}?mode=ro", uri=True)
    dst = sqlite3.connect(target)
    try:
        src.backup(dst)
    finally:
        dst.close()
        src.close()


def backup(config: ServerConfig, output: Path) -> dict[str, object]:
    if not config.database_url.startswith("sqlite"):
        raise SiteRecoveryError(
            Problem(
                "backup-unsupported-database",
                "This server keeps its database on PostgreSQL, which the built-in backup does not copy.",
                "Back the database up with pg_dump and the state directory with this command's "
                "files (pki/, secret.key, passphrase).",
            ),
            Status.UNPROCESSABLE,
        )
    state = config.state_dir
    if not (state / "siterecovery.db").exists():
        raise SiteRecoveryError(
            Problem(
                "backup-no-state",
                f"{state} holds no configuration server database.",
                "Point --state-dir at the server's state directory.",
            ),
            Status.NOT_FOUND,
        )
    with sqlite3.connect(state / "siterecovery.db") as db:
        server_id = str(db.execute("select id from server_identity").fetchone()[0])
    manifest = {"server_id": server_id, "version": __version__, "created_at": time.time(), "files": []}
    output.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp, tarfile.open(output, "w:gz") as tar:
        for name in _DATABASES:
            if (state / name).exists():
                _sqlite_copy(state / name, Path(tmp) / name)
                tar.add(Path(tmp) / name, arcname=name)
                manifest["files"].append(name)  # type: ignore[attr-defined]
        for name in (*_FILES, *_DIRS):
            if (state / name).exists():
                tar.add(state / name, arcname=name)
                manifest["files"].append(name)  # type: ignore[attr-defined]
        data = json.dumps(manifest, indent=2).encode()
        info = tarfile.TarInfo(MANIFEST)
        info.size, info.mode, info.mtime = len(data), 0o600, int(time.time())
        tar.addfile(info, io.BytesIO(data))
    output.chmod(0o600)  # it holds the CA key and the credential key
    return manifest


def restore(archive: Path, state_dir: Path, force: bool = False) -> dict[str, object]:
    if (state_dir / "siterecovery.db").exists() and not force:
        raise SiteRecoveryError(
            Problem(
                "restore-would-overwrite",
                f"{state_dir} already holds a configuration server database.",
                "Restore into an empty state directory, or pass --force to replace it.",
            ),
            Status.CONFLICT,
        )
    try:
        tar = tarfile.open(archive, "r:gz")  # noqa: SIM115 - its errors get their own message; closed below
    except (OSError, tarfile.TarError) as exc:
        raise SiteRecoveryError(
            Problem(
                "backup-unreadable",
                f"{archive} is not a siterecovery backup: {exc}.",
                "Give the file `server backup` wrote.",
            ),
            Status.UNPROCESSABLE,
        ) from exc
    with tar:
        try:
            manifest = json.loads(tar.extractfile(MANIFEST).read())  # type: ignore[union-attr]
        except (KeyError, AttributeError, ValueError) as exc:
            raise SiteRecoveryError(
                Problem(
                    "backup-unreadable",
                    f"{archive} has no valid manifest.",
                    "Give the file `server backup` wrote.",
                ),
                Status.UNPROCESSABLE,
            ) from exc
        state_dir.mkdir(parents=True, exist_ok=True)
        for member in tar.getmembers():
            if member.name != MANIFEST:
                tar.extract(member, state_dir, filter="data")
    for name in ("passphrase", "secret.key", "pki/ca.key"):
        if (state_dir / name).exists():
            (state_dir / name).chmod(0o600)
    return dict(manifest)
