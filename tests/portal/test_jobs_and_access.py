"""Jobs, plans, sign-in and access rules against a real configuration server (no lab needed).

A recovery plan with script actions gives a job whose tasks move at the test's command: a
script waits for a gate file, so the page can be watched mid-run, deterministically.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Page, expect

from tests.conftest import run_cli
from tests.control.conftest import ConfigServer, running_config_server
from tests.portal.conftest import PHONE, nav, shot, sign_in


@pytest.fixture(scope="module")
def cs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ConfigServer]:
    """One server for the module (a start costs seconds): each test runs its own plans, and what
    one test counts (the cancelled jobs, the jobs a refused form did not start) is its own."""
    with running_config_server(tmp_path_factory.mktemp("portal-jobs")) as server:
        yield server


def _plan(cs: ConfigServer, tmp_path: Path, name: str, groups: list[dict[str, object]]) -> None:
    spec = tmp_path / f"{name}.json"
    spec.write_text(json.dumps({"groups": groups}))
    run_cli("plans", "create", name, "--file", str(spec), env=cs.env)


def _script(name: str, command: str) -> dict[str, object]:
    return {"kind": "script", "name": name, "command": command}


def test_sign_in_needs_a_valid_token(cs: ConfigServer, page: Page) -> None:
    page.goto(cs.url + "/jobs")
    expect(page).to_have_url(re.compile(r"/signin\?next=/jobs$"))
    page.get_by_label("API token").fill("sr_not-a-token")
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_role("alert")).to_contain_text("unknown or revoked")
    page.get_by_label("API token").fill(cs.token)
    page.get_by_label("API token").press("Enter")
    expect(page.get_by_role("heading", level=1)).to_have_text("Jobs")  # back where the user wanted to go
    cookie = next(c for c in page.context.cookies() if c["name"] == "siterecovery_session")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
    page.get_by_role("button", name="Sign out").click()
    expect(page.get_by_role("heading", name="Sign in")).to_be_visible()
    page.goto(cs.url + "/")
    expect(page).to_have_url(re.compile(r"/signin"))


def test_plan_job_progress_updates_live_then_resume(
    cs: ConfigServer, page: Page, tmp_path: Path, output_dir: Path
) -> None:
    gate, started = tmp_path / "gate", tmp_path / "started"
    _plan(
        cs,
        tmp_path,
        "drill",
        [
            {"items": [], "actions_after": [_script("warm up", "echo warm")]},
            {
                "items": [],
                "actions_after": [
                    _script("wait for gate", f"touch {started}; while [ ! -f {gate} ]; do sleep 0.05; done"),
                    {"kind": "manual", "name": "check the app", "instructions": "Open the app and log in."},
                    _script("finish", "echo done"),
                ],
            },
        ],
    )
    sign_in(page, cs.url, cs.token)
    nav(page, "Recovery plans")
    plan = page.get_by_role("region", name="drill")
    expect(plan.locator(".plan-actions li").filter(has_text="wait for gate")).to_contain_text("Script")
    plan.get_by_role("button", name="Run failover").click()
    expect(page).to_have_url(re.compile(r"/jobs/job-"))
    page.evaluate("window.__sameDocument = true")

    states = page.locator('tr[data-task] [data-task-field="state"]')
    expect(states.nth(0)).to_have_text("Succeeded")  # changed by the poller, not a reload
    expect(states.nth(1)).to_have_text("Running")
    expect(page.locator('progress[data-progress="task-0"]')).to_have_attribute("value", "100")
    assert page.evaluate("window.__sameDocument === true")
    shot(page, output_dir, "job-running")

    gate.touch()
    expect(page.get_by_role("button", name="Resume")).to_be_visible()  # paused at the manual action
    expect(states.nth(2)).to_have_text("Waiting")
    shot(page, output_dir, "job-paused")
    page.get_by_role("button", name="Resume").click()
    expect(page.locator('[data-job-field="state"]')).to_have_text("Succeeded")
    expect(states).to_have_text(["Succeeded"] * 4)
    expect(page.get_by_role("button", name="Cancel")).to_have_count(0)
    page.set_viewport_size(PHONE)
    shot(page, output_dir, "job-succeeded-390")


def test_cancel_and_failed_task_show_code_and_remediation(
    cs: ConfigServer, page: Page, tmp_path: Path
) -> None:
    _plan(cs, tmp_path, "hangs", [{"items": [], "actions_after": [_script("forever", "sleep 600")]}])
    _plan(cs, tmp_path, "breaks", [{"items": [], "actions_after": [_script("broken", "exit 3")]}])
    sign_in(page, cs.url, cs.token)
    nav(page, "Recovery plans")
    page.get_by_role("region", name="hangs").get_by_role("button", name="Run failover").click()
    expect(page.locator('[data-job-field="state"]')).to_have_text("Running")
    page.get_by_role("button", name="Cancel").click()
    expect(page.locator('[data-job-field="state"]')).to_have_text("Cancelled")

    nav(page, "Recovery plans")
    page.get_by_role("region", name="breaks").get_by_role("button", name="Run failover").click()
    expect(page.locator('[data-job-field="state"]')).to_have_text("Failed")
    failure = page.get_by_role("alert")
    expect(failure).to_contain_text("script-failed")
    expect(failure).to_contain_text("Remediation:")

    nav(page, "Jobs")
    page.get_by_label("State").select_option("cancelled")
    page.get_by_role("button", name="Filter").click()
    rows = page.locator("table tbody tr")
    expect(rows).to_have_count(1)
    expect(rows).to_contain_text("hangs")


def test_forms_need_the_session_csrf_token_and_operator_role(cs: ConfigServer, tmp_path: Path) -> None:
    _plan(cs, tmp_path, "noop", [{"items": [], "actions_after": [_script("noop", "true")]}])
    reader = cs.api("POST", "/api/tokens", json={"name": "viewer", "role": "reader"}).json()["token"]

    def session(token: str) -> tuple[httpx.Client, str]:
        client = httpx.Client(base_url=cs.url)
        assert client.post("/signin", data={"token": token, "next": "/plans"}).status_code == 303
        found = re.search(r'name="csrf" value="([0-9a-f]+)"', client.get("/plans").text)
        assert found is not None
        return client, found.group(1)

    admin, admin_csrf = session(cs.token)
    viewer, viewer_csrf = session(reader)
    try:
        assert "Run failover" not in viewer.get("/plans").text
        before = {j["id"] for j in cs.api("GET", "/api/jobs").json()}
        assert viewer.post("/plans/noop/failover", data={"csrf": viewer_csrf}).status_code == 403
        assert admin.post("/plans/noop/failover", data={"csrf": "0" * 64}).status_code == 403
        assert admin.post("/plans/noop/failover", data={"csrf": viewer_csrf}).status_code == 403
        assert {j["id"] for j in cs.api("GET", "/api/jobs").json()} == before  # nothing was started
        ok = admin.post("/plans/noop/failover", data={"csrf": admin_csrf})
        assert ok.status_code == 303 and ok.headers["location"].startswith("/jobs/job-")
        job = ok.headers["location"].rsplit("/", 1)[1]
        assert viewer.get(f"/portal/api/jobs/{job}").json()["id"] == job  # readers may watch
    finally:
        admin.close()
        viewer.close()
    assert httpx.get(f"{cs.url}/portal/api/jobs/{job}").status_code == 401


def test_assets_are_served_locally(cs: ConfigServer, page: Page) -> None:
    """Works without internet: every request the pages make goes to the configuration server."""
    requested: list[str] = []
    page.on("request", lambda r: requested.append(r.url))
    sign_in(page, cs.url, cs.token)
    nav(page, "Infrastructure")
    expect(page.get_by_role("heading", level=1)).to_have_text("Infrastructure")
    assert requested and all(u.startswith(cs.url) for u in requested), requested
    assert any(u.endswith("/portal/static/portal.css") for u in requested)
    assert any(u.endswith("/portal/static/portal.js") for u in requested)
