"""The portal against a real deployment: a machine failed over to the cloud, re-protected by clicks.

Set-up uses the API (enable → planned failover → commit); every step of the tests themselves is
a click or a key press in real Chromium. Lab edits stand for the world changing (an operator
fixing the master target's VM), not for the product's API.
"""

from __future__ import annotations

import re
from pathlib import Path

import httpx
from playwright.sync_api import Browser, Page, expect

from siterecovery.demo.environment import Environment
from tests.portal.conftest import DESKTOP, MACHINE, PHONE, PROTECTED, nav, new_page, shot, sign_in

PAGES = [
    ("overview", "Overview"),
    ("items", "Replicated items"),
    ("jobs", "Jobs"),
    ("plans", "Recovery plans"),
    ("infrastructure", "Infrastructure"),
]


def _reader_token(env: Environment) -> str:
    return str(env.api.post("/api/tokens", {"name": "auditor", "role": "reader"})["token"])


def test_every_page_at_desktop_and_phone_width(
    deployment: Environment, browser: Browser, output_dir: Path
) -> None:
    for width, viewport in (("1280", DESKTOP), ("390", PHONE)):
        page = new_page(browser, viewport)
        try:
            sign_in(page, deployment.url, deployment.token)
            for name, link in PAGES:
                nav(page, link)
                expect(page.get_by_role("heading", level=1)).to_have_text(link)
                # Nothing may overflow sideways: tables reflow into cards on a phone.
                overflow = page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
                assert overflow <= 0, f"{name} at {width} px is {overflow} px too wide"
                shot(
                    page,
                    output_dir,
                    f"{name}-{width}",
                    docs=name if (name, width) == ("overview", "1280") else "",
                )
        finally:
            page.context.close()


def test_infrastructure_shows_servers_disks_and_retention(deployment: Environment, page: Page) -> None:
    sign_in(page, deployment.url, deployment.token)
    nav(page, "Infrastructure")
    ps = page.get_by_role("row").filter(has_text="ps-cloud")
    expect(ps).to_contain_text("cloud")
    expect(ps).to_contain_text(re.compile(r"\d+ s ago"))
    mt = page.get_by_role("row").filter(has_text="mt-linux")
    expect(mt).to_contain_text("linux")
    expect(mt).to_contain_text("/60")
    expect(mt).to_contain_text("Eligible")
    fabrics = page.get_by_role("region", name="Fabrics")
    expect(fabrics.get_by_role("row").filter(has_text="onprem")).to_contain_text("ago")


def test_items_table_offers_only_valid_actions(deployment: Environment, page: Page) -> None:
    sign_in(page, deployment.url, deployment.token)
    nav(page, "Replicated items")
    row = page.locator(f'tr[data-item="{MACHINE}"]')
    expect(row).to_contain_text("Failover committed")
    expect(row).to_contain_text("On-premises → Cloud")
    expect(row.locator("td.actions a")).to_have_text(["Re-Protect", "Disable"])
    protected = page.locator(f'tr[data-item="{PROTECTED}"]')
    expect(protected).to_contain_text("Protected")
    expect(protected.locator("td.actions a")).to_have_text(["Failover", "Test failover", "Disable"])
    # The keyboard reaches the row actions in order.
    page.get_by_role("link", name=f"Re-Protect {MACHINE}").focus()
    page.keyboard.press("Tab")
    expect(page.get_by_role("link", name=f"Disable {MACHINE}")).to_be_focused()


def test_test_failover_then_cleanup_by_clicks(deployment: Environment, page: Page, output_dir: Path) -> None:
    sign_in(page, deployment.url, deployment.token)
    nav(page, "Replicated items")
    page.get_by_role("link", name=f"Test failover {PROTECTED}").click()
    points = page.get_by_label("Recovery point")
    expect(points).to_have_value("latest")
    expect(points.locator("option").first).to_contain_text("Latest")
    shot(page, output_dir, "test-failover")
    page.get_by_role("button", name="OK").click()
    expect(page.locator('[data-job-field="state"]')).to_have_text("Succeeded", timeout=120_000)

    nav(page, "Replicated items")
    row = page.locator(f'tr[data-item="{PROTECTED}"]')
    expect(row).to_contain_text("Protected")  # replication went on
    expect(row.locator("td.actions a")).to_have_text(["Failover", "Cleanup test failover", "Disable"])
    row.get_by_role("link", name=f"Cleanup test failover {PROTECTED}").click()
    page.get_by_role("button", name="OK").click()
    expect(page.locator('[data-job-field="state"]')).to_have_text("Succeeded", timeout=120_000)
    nav(page, "Replicated items")
    expect(row.locator("td.actions a")).to_have_text(["Failover", "Test failover", "Disable"])


def test_reader_sees_everything_and_no_action_buttons(deployment: Environment, page: Page) -> None:
    token = _reader_token(deployment)
    sign_in(page, deployment.url, token)
    expect(page.get_by_text("auditor · reader")).to_be_visible()
    for _, link in PAGES:
        nav(page, link)
        expect(page.get_by_role("heading", level=1)).to_have_text(link)
        # No action anywhere: only the sign-out form may post.
        assert page.locator("form[method=post]:not([action='/signout'])").count() == 0
        assert page.locator("td.actions, .plan-run, [data-job-actions]").count() == 0
    nav(page, "Replicated items")
    expect(page.locator(f'tr[data-item="{MACHINE}"]')).to_contain_text("Failover committed")
    expect(page.get_by_role("columnheader", name="Actions")).to_have_count(0)
    # The dialog's address typed by hand is refused too.
    page.goto(f"{deployment.url}/items/{MACHINE}/reprotect")
    expect(page.locator(".problems")).to_contain_text("forbidden")
    # And a reader's posted form (with a valid CSRF token of its own session) is refused: 403.
    cookies = {c["name"]: c["value"] for c in page.context.cookies()}
    with httpx.Client(base_url=deployment.url, cookies=cookies) as client:
        csrf = re.search(r'name="csrf" value="([0-9a-f]+)"', client.get("/items").text)
        assert csrf is not None
        refused = client.post(
            f"/items/{MACHINE}/reprotect",
            data={
                "csrf": csrf.group(1),
                "op": "start",
                "master_target": "mt-linux",
                "process_server": "ps-cloud",
            },
        )
    assert refused.status_code == 403
    assert deployment.api.get(f"/api/replicatedItems/{MACHINE}")["state"] == "failover-committed"


def test_reprotect_by_clicks_from_failing_check_to_protected(
    deployment: Environment, page: Page, output_dir: Path
) -> None:
    deployment.lab_set("machine", "mt-linux", "scsi=pvscsi", "enableuuid=false")  # RP-MT-SCSI, RP-MT-UUIDCFG
    sign_in(page, deployment.url, deployment.token)
    nav(page, "Replicated items")
    page.get_by_role("link", name=f"Re-Protect {MACHINE}").click()

    dialog = page.get_by_role("region", name=f"Re-Protect · {MACHINE}")
    expect(dialog.get_by_label("Replication direction after reprotect")).to_contain_text(
        "Cloud → On-premises"
    )
    expect(dialog.get_by_label("Failback policy")).to_have_value("gold-failback")
    expect(dialog.get_by_label("Failback policy")).to_have_attribute("readonly", "")
    expect(dialog.get_by_label("Master target (OS linux)")).to_have_value("mt-linux")
    expect(dialog.get_by_label("Process server")).to_have_value("ps-cloud")
    expect(dialog.get_by_label("Datastore")).to_have_value("ds-vmfs1")

    dialog.get_by_role("button", name="Check readiness").click()
    problems = page.get_by_role("alert")
    expect(problems.locator(".problem")).to_have_count(2)  # every failing rule at once
    expect(problems).to_contain_text("mt-paravirtual-controller")
    expect(problems).to_contain_text("mt-enableuuid-missing")
    expect(problems).to_contain_text("Remediation:")
    expect(problems).to_contain_text("LSI Logic")
    shot(page, output_dir, "reprotect-problems", docs="reprotect-problems")
    page.set_viewport_size(PHONE)
    shot(page, output_dir, "reprotect-problems-390")
    page.set_viewport_size(DESKTOP)

    deployment.lab_set("machine", "mt-linux", "scsi=lsilogic", "enableuuid=true")  # the operator fixes the VM
    page.get_by_role("button", name="Check readiness").click()
    expect(page.get_by_role("status")).to_contain_text("Ready")
    expect(page.get_by_role("alert")).to_have_count(0)
    shot(page, output_dir, "reprotect-ready")

    page.get_by_role("button", name="OK").click()
    expect(page).to_have_url(re.compile(r"/jobs/job-"))
    tasks = page.locator("tr[data-task]")
    expect(tasks.first).to_be_visible()
    states = page.locator('tr[data-task] [data-task-field="state"]')
    expect(states).to_have_text(["Succeeded"] * tasks.count(), timeout=180_000)
    expect(page.locator('[data-job-field="state"]')).to_have_text("Succeeded")
    shot(page, output_dir, "job-detail", docs="job-detail")

    page.get_by_role("link", name=MACHINE, exact=True).click()
    expect(page.get_by_role("heading", level=1)).to_contain_text("Protected")
    nav(page, "Replicated items")
    row = page.locator(f'tr[data-item="{MACHINE}"]')
    expect(row).to_contain_text("Protected")
    expect(row).to_contain_text("Cloud → On-premises")
    expect(row.locator("td.actions a")).to_have_text(["Failback", "Test failover", "Disable"])
    shot(page, output_dir, "items", docs="items")

    # The next move is offered with its own readiness check (FB-1).
    page.get_by_role("link", name=f"Failback {MACHINE}").click()
    page.get_by_role("button", name="Check readiness").click()
    expect(page.get_by_role("status")).to_contain_text("Ready")
    shot(page, output_dir, "failback-ready")


def test_failover_change_point_and_commit_by_clicks(
    deployment: Environment, page: Page, output_dir: Path
) -> None:
    """FW-2 in the portal: fail over, boot again from another point before commit, commit. Runs
    last: it moves the protected machine to the cloud."""
    sign_in(page, deployment.url, deployment.token)
    nav(page, "Replicated items")
    page.get_by_role("link", name=f"Failover {PROTECTED}", exact=True).click()
    page.get_by_role("button", name="OK").click()
    expect(page.locator('[data-job-field="state"]')).to_have_text("Succeeded", timeout=120_000)

    nav(page, "Replicated items")
    row = page.locator(f'tr[data-item="{PROTECTED}"]')
    expect(row).to_contain_text("Failed over")
    expect(row.locator("td.actions a")).to_have_text(["Change recovery point", "Commit", "Disable"])
    row.get_by_role("link", name=f"Change recovery point {PROTECTED}").click()
    dialog = page.get_by_role("region", name=f"Change recovery point · {PROTECTED}")
    expect(dialog).to_contain_text("everything it wrote since it booted is undone")
    points = dialog.get_by_label("Recovery point")
    expect(points.locator("option").first).to_contain_text("Latest")  # the points kept until commit
    shot(page, output_dir, "change-point")
    dialog.get_by_role("button", name="OK").click()
    expect(page).to_have_url(re.compile(r"/jobs/job-"))
    expect(
        page.locator("tr[data-task]").filter(has_text="Revert to the snapshot taken before boot")
    ).to_have_count(1)
    expect(page.locator('[data-job-field="state"]')).to_have_text("Succeeded", timeout=120_000)

    nav(page, "Replicated items")
    row.get_by_role("link", name=f"Commit {PROTECTED}", exact=True).click()
    page.get_by_role("button", name="OK").click()
    expect(page.locator('[data-job-field="state"]')).to_have_text("Succeeded", timeout=60_000)
    nav(page, "Replicated items")
    expect(row).to_contain_text("Failover committed")
    expect(row.locator("td.actions a")).to_have_text(["Re-Protect", "Disable"])
