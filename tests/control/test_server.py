"""The configuration server as a real process: start, migrate, API errors, roles, POL-1."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator

import httpx
import pytest

from tests.conftest import run_cli
from tests.control.conftest import ConfigServer, running_config_server


@pytest.fixture(scope="module")
def cs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ConfigServer]:
    """One server for the module (a start costs seconds): no test here needs another's absence;
    what they create (policies, a reader token) is named by each, and the 422 cases compare the
    policies before and after rather than expect none."""
    with running_config_server(tmp_path_factory.mktemp("server")) as server:
        yield server


def test_fresh_state_dir_is_migrated_and_serves_openapi(cs: ConfigServer) -> None:
    spec = httpx.get(cs.url + "/openapi.json", timeout=60).json()
    assert "/api/replicatedItems" in spec["paths"]
    assert "/api/recoveryPlans/{ident}/{operation}" in spec["paths"]
    tables = {
        r[0]
        for r in sqlite3.connect(cs.state_dir / "siterecovery.db").execute(
            "select name from sqlite_master where type='table'"
        )
    }
    assert {"alembic_version", "policies", "replicated_items", "jobs", "job_tasks", "events"} <= tables
    assert (cs.state_dir / "pki" / "ca.crt").exists()


def test_policy_creates_immutable_failback_policy(cs: ConfigServer) -> None:
    out = run_cli("-o", "json", "policies", "create", "gold", "--rpo-threshold-minutes", "30", env=cs.env)
    assert '"gold-failback"' in out.stdout
    failback = cs.api("GET", "/api/policies/gold-failback").json()
    assert failback["kind"] == "failback"
    assert (
        failback["rpo_threshold_minutes"],
        failback["retention_hours"],
        failback["app_consistent_frequency_minutes"],
    ) == (15, 24, 60)
    assert failback["editable"] is False
    server = cs.api("GET", "/api/server").json()
    assert failback["associated_server_id"] == server["id"]

    resp = cs.api("PATCH", "/api/policies/gold-failback", json={"retention_hours": 48})
    assert resp.status_code == 409
    assert resp.headers["content-type"].startswith("application/problem+json")
    assert resp.json()["code"] == "policy-immutable"
    assert resp.json()["rule"] == "POL-1"

    cli = run_cli("policies", "update", "gold-failback", "--retention-hours", "48", env=cs.env, check=False)
    assert cli.returncode == 2
    assert "policy-immutable" in cli.stderr
    # The forward policy stays editable.
    assert cs.api("PATCH", "/api/policies/gold", json={"retention_hours": 48}).json()["retention_hours"] == 48


def test_roles_and_authentication(cs: ConfigServer) -> None:
    reader = run_cli("tokens", "create", "--role", "reader", "--name", "auditor", env=cs.env).stdout.strip()
    assert cs.api("GET", "/api/policies", token=reader).status_code == 200
    denied = cs.api("POST", "/api/policies", token=reader, json={"name": "x1"})
    assert denied.status_code == 403 and denied.json()["code"] == "forbidden"
    assert cs.api("GET", "/api/policies", token="").status_code == 401
    assert cs.api("GET", "/api/policies", token="sr_not-a-token").status_code == 401
    cli = run_cli("policies", "create", "x2", env={**cs.env, "SITERECOVERY_TOKEN": reader}, check=False)
    assert cli.returncode == 2 and "forbidden" in cli.stderr


@pytest.mark.parametrize(
    ("body", "field"),
    [
        pytest.param(b"{not json", "body", id="malformed-json"),
        pytest.param(
            b'{"name": "p", "rpo_threshold_minutes": "soon"}', "rpo_threshold_minutes", id="wrong-type"
        ),
        pytest.param(b'{"name": ""}', "name", id="empty-name"),
        pytest.param(b'{"name": "p", "colour": "blue"}', "colour", id="unknown-field"),
        pytest.param(b'{"name": "p", "retention_hours": -1}', "retention_hours", id="out-of-range"),
    ],
)
def test_bad_input_is_422_naming_the_field(cs: ConfigServer, body: bytes, field: str) -> None:
    before = cs.api("GET", "/api/policies").json()
    resp = cs.api("POST", "/api/policies", content=body, headers={"content-type": "application/json"})
    assert resp.status_code == 422
    fields = [p["detail"]["field"] for p in resp.json()["problems"]]
    assert any(f == field or f.startswith(field) or f.endswith(field) for f in fields), fields
    assert cs.api("GET", "/api/policies").json() == before  # nothing was created


def test_unknown_ids_are_404_problems(cs: ConfigServer) -> None:
    for path in (
        "/api/policies/nope",
        "/api/jobs/job-nope",
        "/api/replicatedItems/nope",
        "/api/recoveryPlans/nope",
        "/api/servers/nope",
    ):
        resp = cs.api("GET", path)
        assert resp.status_code == 404, path
        assert resp.json()["code"] == "not-found"
    cli = run_cli("jobs", "show", "job-nope", env=cs.env, check=False)
    assert cli.returncode == 2 and "not-found" in cli.stderr


def test_config_show_prints_effective_configuration(tmp_path: pytest.TempPathFactory) -> None:
    out = run_cli(
        "-o",
        "json",
        "config",
        "show",
        "--state-dir",
        str(tmp_path),
        env={"SITERECOVERY_HEARTBEAT_TIMEOUT": "7"},
    )
    assert '"heartbeat_timeout": 7.0' in out.stdout
    assert str(tmp_path) in out.stdout
