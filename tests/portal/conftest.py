"""Real headless Chromium (Debian's, through Playwright) against a real configuration server.

`deployment` is the embedded environment the demo uses — a lab, the configuration server, a
process server and a master target per site, all real processes — with `web1` protected,
failed over to the cloud and committed, ready to be re-protected from the portal.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright

from siterecovery.demo.environment import Environment
from tests.conftest import ROOT, require_tool, stop_environment
from tests.control.conftest import cs  # noqa: F401 - the real configuration server fixture

CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
DESKTOP = {"width": 1280, "height": 900}
PHONE = {"width": 390, "height": 844}
DOCS_IMAGES = ROOT / "docs" / "images"
UPDATE_DOCS = os.environ.get("SITERECOVERY_UPDATE_DOCS_IMAGES") == "1"
MACHINE = "web1"
PROTECTED = "db1"  # stays protected on-premises → cloud
# An action waits up to the context's default (30 s, `new_page`), but Playwright's assertions keep
# their own 5 s unless told: a readiness check or a page that a loaded 2-core box answers in more
# than 5 s failed `expect(...)`. They wait as long as actions do (no cost when the state is there).
ASSERT_TIMEOUT_MS = 30_000
expect.set_options(timeout=ASSERT_TIMEOUT_MS)


@pytest.fixture(scope="session")
def browser() -> Iterator[Browser]:
    executable = require_tool("chromium")
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


def new_page(browser: Browser, viewport: dict[str, int] = DESKTOP) -> Page:
    context = browser.new_context(viewport=viewport)  # type: ignore[arg-type]
    context.set_default_timeout(ASSERT_TIMEOUT_MS)
    return context.new_page()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    p = new_page(browser)
    try:
        yield p
    finally:
        p.context.close()


def sign_in(page: Page, base_url: str, token: str) -> None:
    """The sign-in form, as a person uses it."""
    page.goto(base_url + "/")
    page.get_by_label("API token").fill(token)
    page.get_by_role("button", name="Sign in").click()
    page.get_by_role("heading", name="Overview").wait_for()


def shot(page: Page, folder: Path, name: str, docs: str = "") -> Path:
    """A full-page screenshot in the test's output folder.

    With SITERECOVERY_UPDATE_DOCS_IMAGES=1, `docs` also refreshes docs/images/DOCS.png (the
    README's pictures); a normal run leaves the committed copies alone.
    """
    path = folder / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    if docs and UPDATE_DOCS:
        DOCS_IMAGES.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, DOCS_IMAGES / f"{docs}.png")
    return path


def wait_job(env: Environment, job_id: str, timeout: float = 180) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job: dict[str, Any] = env.api.get(f"/api/jobs/{job_id}")
        if job["state"] in ("succeeded", "failed", "cancelled"):
            if job["state"] != "succeeded":
                raise AssertionError(f"set-up job {job['kind']} {job['state']}: {job['error']}")
            return job
        time.sleep(0.3)
    raise AssertionError(f"set-up job {job_id} did not finish")


def wait_agent(env: Environment, site: str, machine: str = MACHINE, timeout: float = 120) -> None:
    """AG-1: the machine's agent checked in after the machine's last boot."""
    found = env.fabric(site).discover().machine(machine)
    booted = found.boot_time if found is not None and found.boot_time else time.time()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for server in env.api.get("/api/servers"):
            age = server["heartbeat_age_seconds"]
            if server["name"] == f"{site}/{machine}" and age is not None and time.time() - age >= booted:
                return
        time.sleep(0.3)
    raise AssertionError(f"the agent of {machine} ({site}) did not register")


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Environment]:
    """Set-up through the API (the tests' own steps are clicks): web1 failed over and committed,
    db1 protected on-premises → cloud."""
    require_tool("chromium")
    env = Environment(tmp_path_factory.mktemp("deployment"), disk_size=16 << 20)
    try:
        env.start()
        env.api.post("/api/policies", {"name": "gold", "rpo_threshold_minutes": 15})
        for machine in (MACHINE, PROTECTED):  # both boot at once; their agents register in parallel
            env.fabric("onprem").power_on(machine)
        for machine in (MACHINE, PROTECTED):
            wait_agent(env, "onprem", machine)
            started = env.api.post(
                "/api/replicatedItems",
                {
                    "machine": machine,
                    "policy": "gold",
                    "process_server": "ps-onprem",
                    "master_target": "mt-cloud",
                },
            )
            wait_job(env, started["job_id"])
        failover = env.api.post(
            f"/api/replicatedItems/{MACHINE}/failover", {"point": "latest", "planned": True}
        )
        wait_job(env, failover["job_id"])
        commit = env.api.post(f"/api/replicatedItems/{MACHINE}/commit", {})
        wait_job(env, commit["job_id"])
        wait_agent(env, "cloud")
        yield env
    finally:
        stop_environment(env)


def nav(page: Page, link: str) -> None:
    """Follow a link of the main navigation bar."""
    page.get_by_role("navigation", name="Main").get_by_role("link", name=link, exact=True).click()
    page.get_by_role("heading", level=1, name=link).wait_for()
