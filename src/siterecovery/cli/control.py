"""CLI commands that drive the configuration server's API: policies, items, jobs, plans, servers, events."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from siterecovery.api_client import Api
from siterecovery.cli.jobs_view import watch_job
from siterecovery.cli.output import emit
from siterecovery.cli.state import as_json, call

tokens_app = typer.Typer(help="API tokens (admin).", no_args_is_help=True)
policies_app = typer.Typer(help="Replication policies and their failback policies.", no_args_is_help=True)
items_app = typer.Typer(help="Replicated items (protected machines).", no_args_is_help=True)
jobs_app = typer.Typer(help="Jobs: list, show, watch, cancel, resume.", no_args_is_help=True)
plans_app = typer.Typer(help="Recovery plans.", no_args_is_help=True)
servers_app = typer.Typer(
    help="Configuration server, process servers, master targets, agents.", no_args_is_help=True
)
events_app = typer.Typer(help="Events and alerts.", no_args_is_help=True)


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def _seconds(text: str) -> int:
    """`30d`, `12h`, `90m`, `3600s` or plain seconds."""
    value = text.strip().lower()
    unit = _UNITS.get(value[-1:], 0)
    number = value[:-1] if unit else value
    if not number.isdigit():
        raise typer.BadParameter(f"{text!r} is not a duration such as 30d, 12h, 90m or 3600s.")
    return int(number) * (unit or 1)


@tokens_app.command("create")
def tokens_create(
    ctx: typer.Context,
    role: Annotated[str, typer.Option(help="reader | operator | admin")],
    name: Annotated[str, typer.Option(help="what the token is for")] = "cli",
    expires_in: Annotated[
        str | None, typer.Option(help="lifetime: 30d, 12h, 90m or seconds (default: the server's, 30 days)")
    ] = None,
) -> None:
    body: dict[str, object] = {"name": name, "role": role}
    if expires_in is not None:
        body["expires_in_seconds"] = _seconds(expires_in)
    out = call(ctx, lambda api: api.post("/api/tokens", body))
    if as_json(ctx):
        emit(out, True)
    else:
        typer.echo(out["token"])


@tokens_app.command("list")
def tokens_list(ctx: typer.Context) -> None:
    """User tokens with their expiry; revoked and expired ones are listed too."""
    tokens = call(ctx, lambda api: api.get("/api/tokens"))
    if as_json(ctx):
        emit(tokens, True)
        return
    for t in tokens:
        at = t["expires_at"]
        t["expires"] = "never" if at is None else time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(at))
    emit(tokens, False, ("id", "name", "role", "expires", "expired", "revoked"))


@tokens_app.command("revoke")
def tokens_revoke(ctx: typer.Context, token_id: str) -> None:
    """Revoke a token (by id, see `tokens list`): refused from its next request on."""
    out = call(ctx, lambda api: api.post(f"/api/tokens/{token_id}/revoke", {}))
    emit(out, as_json(ctx), ("id", "name", "role", "revoked"))


_POLICY_COLUMNS = (
    "name",
    "kind",
    "rpo_threshold_minutes",
    "retention_hours",
    "app_consistent_frequency_minutes",
    "editable",
    "id",
)


@policies_app.command("create")
def policies_create(
    ctx: typer.Context,
    name: str,
    rpo_threshold_minutes: int = 60,
    retention_hours: int = 24,
    app_consistent_frequency_minutes: int = 60,
    crash_consistent_frequency_seconds: int = 5,
) -> None:
    """Create a replication policy and with it its failback policy (15 min / 24 h / 60 min, POL-1)."""
    body = {
        "name": name,
        "rpo_threshold_minutes": rpo_threshold_minutes,
        "retention_hours": retention_hours,
        "app_consistent_frequency_minutes": app_consistent_frequency_minutes,
        "crash_consistent_frequency_seconds": crash_consistent_frequency_seconds,
    }
    call(ctx, lambda api: api.post("/api/policies", body))
    policies = call(ctx, lambda api: api.get("/api/policies"))
    made = [p for p in policies if p["name"] in (name, f"{name}-failback")]
    emit(made, as_json(ctx), _POLICY_COLUMNS)


@policies_app.command("list")
def policies_list(ctx: typer.Context) -> None:
    emit(call(ctx, lambda api: api.get("/api/policies")), as_json(ctx), _POLICY_COLUMNS)


@policies_app.command("show")
def policies_show(ctx: typer.Context, policy: str) -> None:
    emit(call(ctx, lambda api: api.get(f"/api/policies/{policy}")), as_json(ctx))


@policies_app.command("update")
def policies_update(
    ctx: typer.Context,
    policy: str,
    rpo_threshold_minutes: int | None = None,
    retention_hours: int | None = None,
    app_consistent_frequency_minutes: int | None = None,
) -> None:
    body = {
        k: v
        for k, v in {
            "rpo_threshold_minutes": rpo_threshold_minutes,
            "retention_hours": retention_hours,
            "app_consistent_frequency_minutes": app_consistent_frequency_minutes,
        }.items()
        if v is not None
    }
    emit(call(ctx, lambda api: api.patch(f"/api/policies/{policy}", body)), as_json(ctx), _POLICY_COLUMNS)


_ITEM_COLUMNS = ("name", "direction", "state", "health", "rpo_seconds", "id")


@items_app.command("list")
def items_list(ctx: typer.Context) -> None:
    emit(call(ctx, lambda api: api.get_all("/api/replicatedItems")), as_json(ctx), _ITEM_COLUMNS)


@items_app.command("show")
def items_show(ctx: typer.Context, item: str) -> None:
    emit(call(ctx, lambda api: api.get(f"/api/replicatedItems/{item}")), as_json(ctx))


def _listing(api: Api, all_pages: bool) -> Callable[..., Any]:
    """The first page of a paged list (the newest), or every page (`--all`, follows X-Next-After)."""
    return api.get_all if all_pages else api.get


_JOB_COLUMNS = ("id", "kind", "target_name", "state", "percent")


@jobs_app.command("list")
def jobs_list(
    ctx: typer.Context,
    state: str | None = None,
    kind: str | None = None,
    target: str | None = None,
    all_pages: bool = typer.Option(False, "--all", help="every job, not only the newest 100"),
) -> None:
    emit(
        call(
            ctx,
            lambda api: (api.get_all if all_pages else api.get)(
                "/api/jobs", state=state, kind=kind, target=target
            ),
        ),
        as_json(ctx),
        _JOB_COLUMNS,
    )


@jobs_app.command("show")
def jobs_show(ctx: typer.Context, job_id: str) -> None:
    job = call(ctx, lambda api: api.get(f"/api/jobs/{job_id}"))
    if as_json(ctx):
        emit(job, True)
        return
    emit(job, False, _JOB_COLUMNS)
    emit(job["tasks"], False, ("ordinal", "name", "state", "percent", "bytes_done", "attempts", "message"))


@jobs_app.command("watch")
def jobs_watch(ctx: typer.Context, job_id: str) -> None:
    """Follow a job with a live progress bar per task; exits non-zero unless it succeeds."""
    job = call(ctx, lambda api: watch_job(api, job_id, quiet=as_json(ctx)))
    if as_json(ctx):
        emit(job, True)
    if job["state"] != "succeeded":
        raise typer.Exit(1)


@jobs_app.command("cancel")
def jobs_cancel(ctx: typer.Context, job_id: str) -> None:
    emit(call(ctx, lambda api: api.post(f"/api/jobs/{job_id}/cancel")), as_json(ctx))


@jobs_app.command("resume")
def jobs_resume(ctx: typer.Context, job_id: str) -> None:
    """Continue a job paused at a manual action."""
    emit(call(ctx, lambda api: api.post(f"/api/jobs/{job_id}/resume")), as_json(ctx))


@plans_app.command("create")
def plans_create(
    ctx: typer.Context,
    name: str,
    file: Annotated[Path, typer.Option(help='JSON: {"groups": [{"items": [...], "actions_after": [...]}]}')],
) -> None:
    try:
        spec: dict[str, Any] = json.loads(file.read_text())
    except (OSError, ValueError) as exc:
        typer.echo(f"error [invalid-input] cannot read plan file {file}: {exc}", err=True)
        raise typer.Exit(2) from None
    emit(call(ctx, lambda api: api.post("/api/recoveryPlans", {"name": name, **spec})), as_json(ctx))


@plans_app.command("list")
def plans_list(ctx: typer.Context) -> None:
    emit(call(ctx, lambda api: api.get("/api/recoveryPlans")), as_json(ctx), ("name", "id", "groups"))


@plans_app.command("show")
def plans_show(ctx: typer.Context, plan: str) -> None:
    emit(call(ctx, lambda api: api.get(f"/api/recoveryPlans/{plan}")), as_json(ctx))


def _plan_op(operation: str) -> Any:
    def run(
        ctx: typer.Context,
        plan: str,
        point: str = "latest",
        planned: bool = False,
        values: Annotated[Path | None, typer.Option(help="JSON of per-machine values")] = None,
        wait: Annotated[bool, typer.Option(help="watch the job until it ends")] = True,
    ) -> None:
        body: dict[str, Any] = {"point": point, "planned": planned}
        if values is not None:
            body["items"] = json.loads(values.read_text())
        started = call(ctx, lambda api: api.post(f"/api/recoveryPlans/{plan}/{operation}", body))
        if not wait:
            emit(started, as_json(ctx))
            return
        jobs_watch(ctx, started["job_id"])

    run.__doc__ = f"Run {operation} for every machine of a recovery plan, group by group."
    return run


for _op in ("failover", "change-point", "commit", "reprotect", "failback"):
    plans_app.command(_op)(_plan_op(_op))

_SERVER_COLUMNS = ("name", "kind", "site", "os_type", "health", "connected", "heartbeat_age_seconds", "id")


@servers_app.command("list")
def servers_list(ctx: typer.Context) -> None:
    emit(call(ctx, lambda api: api.get("/api/servers")), as_json(ctx), _SERVER_COLUMNS)


@servers_app.command("show")
def servers_show(ctx: typer.Context, server: str) -> None:
    emit(call(ctx, lambda api: api.get(f"/api/servers/{server}")), as_json(ctx))


@servers_app.command("refresh")
def servers_refresh(ctx: typer.Context, server: str) -> None:
    """Ask a master target or process server to re-discover now (e.g. a new retention volume)."""
    emit(call(ctx, lambda api: api.post(f"/api/servers/{server}/refresh")), as_json(ctx), _SERVER_COLUMNS)


@servers_app.command("remove")
def servers_remove(
    ctx: typer.Context,
    server: str,
    force: Annotated[
        bool, typer.Option("--force", help="remove it even while it replicates items (e.g. compromised)")
    ] = False,
) -> None:
    """Remove a component: its certificates and token are revoked and every hop refuses it (admin)."""
    emit(call(ctx, lambda api: api.delete(f"/api/servers/{server}", force=force)), as_json(ctx))


@events_app.command("list")
def events_list(
    ctx: typer.Context,
    alerts: bool = False,
    active: bool = False,
    all_pages: bool = typer.Option(False, "--all", help="every event, not only the newest 200"),
) -> None:
    emit(
        call(
            ctx,
            lambda api: (api.get_all if all_pages else api.get)("/api/events", alerts=alerts, active=active),
        ),
        as_json(ctx),
        ("id", "severity", "alert", "active", "code", "message"),
    )
