"""CS-3: a configuration server restored onto a new host keeps its identity, CA, tokens and data."""

from __future__ import annotations

import tarfile
from pathlib import Path

from tests.conftest import free_port, run_cli
from tests.control.conftest import ConfigServer


def test_restore_on_a_new_host_keeps_identity_and_registered_components(
    cs: ConfigServer, tmp_path: Path
) -> None:
    run_cli("policies", "create", "gold", env=cs.env)
    passphrase = cs.api("GET", "/api/server/passphrase").json()["passphrase"]
    reg = cs.api(
        "POST",
        "/api/components/register",
        token="",
        json={"passphrase": passphrase, "kind": "master-target", "name": "mt-linux", "os_type": "linux"},
    ).json()
    identity = cs.api("GET", "/api/server").json()
    ca_before = cs.api("GET", "/api/ca").text
    archive = tmp_path / "cs-backup.tar.gz"
    out = run_cli("server", "backup", "--state-dir", str(cs.state_dir), "--file", str(archive))  # online
    assert identity["id"] in out.stdout
    assert oct(archive.stat().st_mode & 0o777) == "0o600"
    with tarfile.open(archive) as tar:
        assert {"siterecovery.db", "pki/ca.key", "secret.key", "passphrase", "manifest.json"} <= set(
            tar.getnames()
        )
    cs.stop()

    new_home = tmp_path / "new-host"
    run_cli("server", "restore", str(archive), "--state-dir", str(new_home))
    again = run_cli("server", "restore", str(archive), "--state-dir", str(new_home), check=False)
    assert again.returncode == 2 and "restore-would-overwrite" in again.stderr
    restored = ConfigServer(
        state_dir=new_home, port=free_port(), log=tmp_path / "restored.log", token=cs.token
    )
    restored.start()
    try:
        assert restored.api("GET", "/api/server").json()["id"] == identity["id"]
        assert restored.api("GET", "/api/ca").text == ca_before  # component certificates still verify
        assert [p["name"] for p in restored.api("GET", "/api/policies").json()] == ["gold", "gold-failback"]
        hb = restored.api(
            "POST", f"/api/components/{reg['id']}/heartbeat", token=reg["token"], json={"stats": {}}
        )
        assert hb.status_code == 200  # the component's token survived the move
        assert restored.api("GET", "/api/server/passphrase").json()["passphrase"] == passphrase
    finally:
        restored.stop()


def test_backup_of_a_missing_state_dir_is_a_clear_error(tmp_path: Path) -> None:
    out = run_cli(
        "server",
        "backup",
        "--state-dir",
        str(tmp_path / "nothing"),
        "--file",
        str(tmp_path / "b.tgz"),
        check=False,
    )
    assert out.returncode == 2 and "backup-no-state" in out.stderr
    bad = tmp_path / "not-a-backup.tgz"
    bad.write_text("hello")
    out = run_cli("server", "restore", str(bad), "--state-dir", str(tmp_path / "x"), check=False)
    assert out.returncode == 2 and "backup-unreadable" in out.stderr
