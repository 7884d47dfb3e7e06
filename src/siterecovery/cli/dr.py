"""`items enable|failover|commit|reprotect|failback|disable`: the DR cycle from the command line.

Each starts a job and, unless `--no-wait`, follows it with live progress bars; the exit code is
non-zero unless the job succeeded. `--what-if` lists every failing prerequisite and changes nothing.
"""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.markup import escape

from siterecovery.cli.control import items_app, jobs_watch
from siterecovery.cli.output import console, emit
from siterecovery.cli.state import as_json, call

Wait = Annotated[bool, typer.Option(help="follow the job until it ends")]
points_app = typer.Typer(help="Recovery points.", no_args_is_help=True)


def _run(ctx: typer.Context, path: str, body: dict[str, Any], wait: bool) -> None:
    started = call(ctx, lambda api: api.post(path, body))
    if not wait:
        emit(started, as_json(ctx))
        return
    if not as_json(ctx):
        console.print(f"job {started['job_id']}")
    jobs_watch(ctx, started["job_id"])


def _readiness(ctx: typer.Context, out: dict[str, Any]) -> None:
    if as_json(ctx):
        emit(out, True)
    else:
        for p in out["problems"]:
            console.print(f"[red]✗[/] {escape('[' + p['code'] + ']')} {escape(p['message'])}")
            console.print(f"    remediation: {escape(p['remediation'])}")
        for n in out.get("notes", []):
            console.print(f"[cyan]•[/] {escape(n['message'])}")
        console.print(
            "[green]ready[/]" if out["ready"] else f"[red]{len(out['problems'])} prerequisite(s) fail[/]"
        )
    if not out["ready"]:
        raise typer.Exit(1)


@items_app.command("enable")
def enable(
    ctx: typer.Context,
    machine: str,
    policy: Annotated[str, typer.Option()],
    process_server: Annotated[str, typer.Option()],
    master_target: Annotated[str, typer.Option()],
    source_fabric: str = "onprem",
    target_fabric: str = "cloud",
    resource_group: str = "",
    target_datastore: Annotated[str, typer.Option(help="libvirt target: the replica volumes' pool")] = "",
    recovery_name: Annotated[str, typer.Option(help="the recovery machine's name (default its own)")] = "",
    group: Annotated[str | None, typer.Option(help="replication group (FW-4)")] = None,
    wait: Wait = True,
) -> None:
    """Protect a machine: initial replication to the recovery site, then continuous (FW-1)."""
    body = {
        "machine": machine,
        "policy": policy,
        "process_server": process_server,
        "master_target": master_target,
        "source_fabric": source_fabric,
        "target_fabric": target_fabric,
        "resource_group": resource_group,
        "target_datastore": target_datastore,
        "recovery_name": recovery_name,
        "group": group,
    }
    _run(ctx, "/api/replicatedItems", body, wait)


@items_app.command("failover")
def failover(
    ctx: typer.Context,
    item: str,
    point: Annotated[str, typer.Option(help="latest | latest-app | a point id | a time")] = "latest",
    planned: Annotated[bool, typer.Option(help="shut the source down and drain: no data loss")] = False,
    test: Annotated[bool, typer.Option(help="an isolated, disposable copy; replication goes on")] = False,
    wait: Wait = True,
) -> None:
    """Fail over to the recovery site at a recovery point (FW-2)."""
    body = {"point": point, "planned": planned, "test": test}
    _run(ctx, f"/api/replicatedItems/{item}/failover", body, wait)


@items_app.command("test-cleanup")
def test_cleanup(ctx: typer.Context, item: str, wait: Wait = True) -> None:
    """Delete the test failover's machine and its disk copies."""
    _run(ctx, f"/api/replicatedItems/{item}/testCleanup", {}, wait)


@items_app.command("bookmark")
def bookmark(ctx: typer.Context, item: str) -> None:
    """Take an app-consistent recovery point now (a group point across its replication group)."""
    emit(call(ctx, lambda api: api.post(f"/api/replicatedItems/{item}/bookmarks")), as_json(ctx))


@points_app.command("list")
def points_list(ctx: typer.Context, item: str) -> None:
    """The item's recovery points, newest first (latest, app-consistent, crash-consistent, group)."""
    rows = call(ctx, lambda api: api.get(f"/api/replicatedItems/{item}/recoveryPoints"))
    emit(rows, as_json(ctx), ("id", "kind", "time_utc", "unusable"))


@items_app.command("change-point")
def change_point(
    ctx: typer.Context,
    item: str,
    point: Annotated[str, typer.Option(help="latest | latest-app | a point id | a time")],
    wait: Wait = True,
) -> None:
    """Before commit: restart the recovery machine from another point; what it wrote is undone (FW-2)."""
    _run(ctx, f"/api/replicatedItems/{item}/changePoint", {"point": point}, wait)


@items_app.command("commit")
def commit(ctx: typer.Context, item: str, wait: Wait = True) -> None:
    """Commit a failover (its recovery point is final)."""
    _run(ctx, f"/api/replicatedItems/{item}/commit", {}, wait)


@items_app.command("reprotect")
def reprotect(
    ctx: typer.Context,
    item: str,
    master_target: Annotated[str, typer.Option()],
    process_server: Annotated[str, typer.Option()],
    datastore: str = "",
    retention_volume: str = "",
    vcenter: Annotated[
        str, typer.Option(help="fail back to this vCenter (fabric name) instead of the original one")
    ] = "",
    agent: Annotated[
        bool, typer.Option("--agent", help="from Azure: through an agent in the recovery VM (needs AZ-VPN)")
    ] = False,
    what_if: Annotated[bool, typer.Option("--what-if", help="list every failing prerequisite")] = False,
    wait: Wait = True,
) -> None:
    """Replicate in the reverse direction of the last failover (RPW-1..7)."""
    body = {
        "master_target": master_target,
        "process_server": process_server,
        "datastore": datastore,
        "retention_volume": retention_volume,
        "vcenter": vcenter,
        "agent": agent,
        "what_if": what_if,
    }
    if what_if:
        _readiness(ctx, call(ctx, lambda api: api.post(f"/api/replicatedItems/{item}/reprotect", body)))
        return
    _run(ctx, f"/api/replicatedItems/{item}/reprotect", body, wait)


@items_app.command("failback")
def failback(
    ctx: typer.Context,
    item: str,
    point: str = "latest",
    what_if: Annotated[bool, typer.Option("--what-if", help="list every failing prerequisite")] = False,
    wait: Wait = True,
) -> None:
    """Planned failover back to on-premises: shut down the cloud machine, drain, boot on-premises (FB-1)."""
    body = {"point": point, "what_if": what_if}
    if what_if:
        _readiness(ctx, call(ctx, lambda api: api.post(f"/api/replicatedItems/{item}/failback", body)))
        return
    _run(ctx, f"/api/replicatedItems/{item}/failback", body, wait)


@items_app.command("disable")
def disable(ctx: typer.Context, item: str, wait: Wait = True) -> None:
    """Turn protection off (the item can no longer be reprotected, RP-ELIGIBLE)."""
    _run(ctx, f"/api/replicatedItems/{item}/disable", {}, wait)
