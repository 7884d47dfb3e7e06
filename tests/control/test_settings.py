"""Each service's settings: flag > SITERECOVERY_* > the TOML file's table > default, and `config show`."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

from siterecovery.config import (
    AgentSettings,
    LogFormat,
    MasterTargetSettings,
    Origin,
    ProcessServerSettings,
    ServerConfig,
    load_settings,
)
from siterecovery.dataplane.replica import DEFAULT_SPOOL_LIMIT
from siterecovery.errors import SiteRecoveryError
from tests.conftest import ROOT, free_port, run_cli
from tests.control.conftest import ConfigServer


def _file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "settings.toml"
    path.write_text(text)
    return path


def test_flag_beats_env_beats_file_beats_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    file = _file(
        tmp_path,
        '[process-server]\nlisten = "127.0.0.1:1001"\nsite = "file-site"\nname = "file-name"\n'
        'log-format = "json"\n',
    )
    monkeypatch.setenv("SITERECOVERY_LISTEN", "127.0.0.1:2002")
    monkeypatch.setenv("SITERECOVERY_SITE", "env-site")
    eff = load_settings(ProcessServerSettings, {"listen": "127.0.0.1:3003", "site": None}, file)
    s = eff.settings
    assert (s.listen, s.site, s.name, s.interval) == ("127.0.0.1:3003", "env-site", "file-name", 2.0)
    assert s.log_format is LogFormat.JSON  # a dash in the file's key is the field's underscore
    origins = {r.name: (r.origin, r.where) for r in eff.rows()}
    assert origins["listen"] == (Origin.FLAG, "")
    assert origins["site"] == (Origin.ENV, "SITERECOVERY_SITE")
    assert origins["name"] == (Origin.FILE, f"{file} [process-server]")
    assert origins["interval"] == (Origin.DEFAULT, "")


def test_each_service_reads_its_own_table(tmp_path: Path) -> None:
    file = _file(tmp_path, '[agent]\nmachine = "web-01"\n[master-target]\nname = "mt-9"\nvolumes = ["/v1"]\n')
    assert load_settings(AgentSettings, {}, file).settings.machine == "web-01"
    mt = load_settings(MasterTargetSettings, {}, file).settings
    assert (mt.name, mt.volumes, mt.machine) == ("mt-9", [Path("/v1")], None)


def test_server_file_lives_in_its_state_dir_and_cannot_move_it(tmp_path: Path) -> None:
    elsewhere = tmp_path / "x"
    (tmp_path / "config.toml").write_text(f'[server]\nheartbeat_timeout = 9\nstate_dir = "{elsewhere}"\n')
    cfg = load_settings(ServerConfig, {"state_dir": tmp_path}).settings
    assert cfg.heartbeat_timeout == 9.0
    assert cfg.state_dir == tmp_path.resolve()
    assert cfg.database_url == f"sqlite:///{tmp_path.resolve() / 'siterecovery.db'}"


@pytest.mark.parametrize(
    ("text", "env", "named"),
    [
        pytest.param('[agent]\nmachin = "x"\n', {}, "machin (file", id="unknown-key"),
        pytest.param(
            "", {"SITERECOVERY_INTERVAL": "soon"}, "interval (env SITERECOVERY_INTERVAL)", id="bad-env"
        ),
        pytest.param("[agent\n", {}, "cannot be read", id="broken-toml"),
    ],
)
def test_bad_setting_is_refused_naming_it_and_its_source(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, text: str, env: dict[str, str], named: str
) -> None:
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(SiteRecoveryError) as err:
        load_settings(AgentSettings, {}, _file(tmp_path, text))
    assert err.value.first.code == "config-invalid"
    assert named in err.value.first.message


def test_agent_spool_default_is_the_data_planes() -> None:
    assert AgentSettings().spool_limit == DEFAULT_SPOOL_LIMIT


def test_config_show_names_sources_and_masks_secrets(tmp_path: Path) -> None:
    file = _file(tmp_path, '[agent]\nmachine = "web-01"\nspool_limit = 4096\n')
    env = {"SITERECOVERY_CONFIG": str(file), "SITERECOVERY_DRAIN_TIMEOUT": "12"}
    out = json.loads(run_cli("-o", "json", "config", "show", "--service", "agent", env=env).stdout)
    assert out["service"] == "agent"
    assert out["settings"]["machine"] == "web-01" and out["settings"]["drain_timeout"] == 12.0
    assert out["sources"]["spool_limit"] == f"file {file} [agent]"
    assert out["sources"]["drain_timeout"] == "env SITERECOVERY_DRAIN_TIMEOUT"
    assert out["sources"]["interval"] == "default"

    secret = {"SITERECOVERY_DATABASE_URL": "postgresql://sr:hunter2@db.example/sr"}
    table = run_cli("config", "show", "--state-dir", str(tmp_path), env=secret).stdout
    assert "hunter2" not in table
    assert "postgresql://sr:********@db.example/sr" in table
    assert "env SITERECOVERY_DATABASE_URL" in table

    storage = {"SITERECOVERY_AZURE_STORAGE": "AccountName=sr;AccountKey=c2VjcmV0"}
    mt = json.loads(run_cli("-o", "json", "config", "show", "--service", "master-target", env=storage).stdout)
    assert mt["settings"]["azure_storage"] == "********"
    assert mt["sources"]["azure_storage"] == "env SITERECOVERY_AZURE_STORAGE"

    bad = run_cli("config", "show", "--service", "agent", env={"SITERECOVERY_INTERVAL": "x"}, check=False)
    assert bad.returncode == 2 and "config-invalid" in bad.stderr


def _module_level_environ_reads(tree: ast.Module) -> list[int]:
    """Lines reading os.environ/os.getenv outside any function body (so at import time)."""
    lines: list[int] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            return
        if isinstance(node, ast.Attribute) and node.attr in ("environ", "getenv"):
            lines.append(node.lineno)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return lines


def test_nothing_reads_the_environment_at_import_time() -> None:
    found = {
        str(path.relative_to(ROOT)): lines
        for path in sorted((ROOT / "src").rglob("*.py"))
        if (lines := _module_level_environ_reads(ast.parse(path.read_text())))
    }
    assert found == {}
    # The check sees what it is meant to see.
    assert _module_level_environ_reads(ast.parse('import os\nX = os.environ.get("A")\n')) == [2]


def test_server_with_json_logs_from_the_environment_writes_only_json(tmp_path: Path) -> None:
    server = ConfigServer(
        state_dir=tmp_path / "state",
        port=free_port(),
        log=tmp_path / "server.log",
        extra_env={"SITERECOVERY_LOG_FORMAT": "json", "SITERECOVERY_LOG_LEVEL": "INFO"},
    )
    server.start()
    server.stop()
    records = [json.loads(line) for line in server.log.read_text().splitlines() if line.strip()]
    messages = [r["message"] for r in records]
    assert any(m.startswith("serving on 127.0.0.1:") for m in messages)
    token = next(r for r in records if r["message"].startswith("initial admin token"))
    assert token["level"] == "WARNING" and token["logger"] == "siterecovery.server"
