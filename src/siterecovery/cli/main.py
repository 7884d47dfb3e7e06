"""Entry point of the `siterecovery` command.

Service commands start processes (`server`, `process-server`, `master-target`, `agent`); every
other command is a client of the configuration server's REST API.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from enum import StrEnum
from pathlib import Path
from typing import Annotated, TypeVar

import typer

from siterecovery.api_client import Api, ApiError
from siterecovery.cli import control, dataplane, dr, fabrics, lab
from siterecovery.cli.output import emit, fail
from siterecovery.cli.state import CliState, call, state
from siterecovery.config import (
    SETTINGS,
    LogFormat,
    LogLevel,
    ServerConfig,
    Service,
    load_server_config,
    load_settings,
)
from siterecovery.control.backup import backup, restore
from siterecovery.errors import SiteRecoveryError
from siterecovery.fabrics.lab_build import VM_MIN_DISK_SIZE, parse_size
from siterecovery.fabrics.lab_model import Accel, GuestKind
from siterecovery.logs import configure_logging

R = TypeVar("R")


class OutputFormat(StrEnum):
    TABLE = "table"
    JSON = "json"


app = typer.Typer(
    help="siterecovery: replicate, fail over, reprotect and fail back machines.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
server_app = typer.Typer(help="Run and manage the configuration server.")
config_app = typer.Typer(help="Effective configuration.", no_args_is_help=True)


@app.callback()
def root(
    ctx: typer.Context,
    server: Annotated[
        str | None, typer.Option(envvar="SITERECOVERY_SERVER", help="configuration server URL")
    ] = None,
    token: Annotated[str | None, typer.Option(envvar="SITERECOVERY_TOKEN", help="API bearer token")] = None,
    ca_file: Annotated[
        str | None, typer.Option(envvar="SITERECOVERY_CA_FILE", help="CA certificate for an HTTPS server")
    ] = None,
    output: Annotated[OutputFormat, typer.Option("--output", "-o")] = OutputFormat.TABLE,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    ctx.obj = CliState(Api.from_env(server, token, ca_file), output is OutputFormat.JSON)


ConfigOpt = Annotated[
    Path | None, typer.Option("--config", help="TOML settings file [env SITERECOVERY_CONFIG]")
]
StateDir = Annotated[
    Path | None, typer.Option("--state-dir", help="default $SITERECOVERY_HOME or ~/.local/share/siterecovery")
]


@server_app.callback(invoke_without_command=True)
def server(
    ctx: typer.Context,
    state_dir: StateDir = None,
    database_url: Annotated[
        str | None, typer.Option(help="SQLAlchemy URL; default SQLite in the state dir")
    ] = None,
    listen: Annotated[str | None, typer.Option(help="HOST:PORT, default 127.0.0.1:8443")] = None,
    tls: Annotated[
        bool | None, typer.Option("--tls/--no-tls", help="serve the API over HTTPS with the server's CA")
    ] = None,
    tls_name: Annotated[
        list[str] | None,
        typer.Option(help="a DNS name or IP components use to reach the server (repeatable; --tls)"),
    ] = None,
    admin_token_file: Annotated[
        str | None, typer.Option(help="on first start, also write the admin token to this file (0600)")
    ] = None,
    config: ConfigOpt = None,
    log_format: Annotated[LogFormat | None, typer.Option("--log-format", help="text or json [text]")] = None,
    log_level: Annotated[LogLevel | None, typer.Option("--log-level", help="[WARNING]")] = None,
) -> None:
    """Run the configuration server (API, database, jobs, portal)."""
    if ctx.invoked_subcommand is not None:
        return
    # Loaded here, not at the top: DBOS and uvicorn add about a second and a half to every
    # other command of the CLI (not an import cycle).
    from siterecovery.server.main import serve

    flags = {
        "state_dir": state_dir,
        "database_url": database_url,
        "listen": listen,
        "tls": tls,
        "log_format": log_format,
        "log_level": log_level,
    }
    cfg = _local(ctx, lambda: load_settings(ServerConfig, flags, config)).settings
    if tls_name:
        cfg = cfg.model_copy(update={"tls_names": ",".join([cfg.tls_names, *tls_name]).strip(",")})
    configure_logging(cfg.log_level, cfg.log_format)
    serve(cfg, admin_token_file)


@server_app.command("passphrase")
def server_passphrase(ctx: typer.Context, rotate: bool = False) -> None:
    """Show (or rotate) the passphrase components register with (admin)."""
    path = "/api/server/passphrase/rotate" if rotate else "/api/server/passphrase"
    out = call(ctx, lambda api: api.post(path) if rotate else api.get(path))
    if state(ctx).as_json:
        emit(out, True)
    else:
        typer.echo(out["passphrase"])


@server_app.command("backup")
def server_backup(
    ctx: typer.Context,
    output: Annotated[Path, typer.Option("--file", help="the tar.gz to write (mode 0600)")],
    state_dir: StateDir = None,
) -> None:
    """Back up the configuration server's state (CS-3); safe while it runs."""
    manifest = _local(ctx, lambda: backup(load_server_config(state_dir), output))
    typer.echo(f"backed up server {manifest['server_id']} to {output}")


@server_app.command("restore")
def server_restore(
    ctx: typer.Context,
    archive: Path,
    state_dir: StateDir = None,
    force: Annotated[bool, typer.Option(help="replace an existing state directory")] = False,
) -> None:
    """Restore a backup into a state directory; the server keeps its id, CA and advertised address."""
    cfg = load_server_config(state_dir)
    manifest = _local(ctx, lambda: restore(archive, cfg.state_dir, force))
    typer.echo(f"restored server {manifest['server_id']} into {cfg.state_dir}")


def _local(ctx: typer.Context, action: Callable[[], R]) -> R:
    """Run a local (not API) server operation; its problems print like the API's."""
    try:
        return action()
    except SiteRecoveryError as exc:
        body = {"problems": [p.as_dict() for p in exc.problems], **exc.first.as_dict()}
        raise fail(ApiError(int(exc.status), body), state(ctx).as_json) from None


@config_app.command("show")
def config_show(
    ctx: typer.Context,
    service: Annotated[Service, typer.Option("--service", help="whose settings")] = Service.SERVER,
    state_dir: StateDir = None,
    config: ConfigOpt = None,
) -> None:
    """Print a service's effective settings and where each came from (env > file > default).

    Flags are the service's own command line, so they are not seen here; secrets are masked.
    """
    flags = {"state_dir": state_dir} if service is Service.SERVER else {}
    effective = _local(ctx, lambda: load_settings(SETTINGS[service], flags, config))
    rows = effective.rows()
    if state(ctx).as_json:
        out = {
            "service": service.value,
            "settings": {r.name: r.value for r in rows},
            "sources": {r.name: r.source for r in rows},
        }
        typer.echo(json.dumps(out, indent=2))
    else:
        table = [{"setting": r.name, "value": r.value, "source": r.source} for r in rows]
        emit(table, False, ("setting", "value", "source"))


@app.command("demo")
def demo(
    disk_size: Annotated[str, typer.Option(help="size of each lab disk, e.g. 64M or 1G")] = "64M",
    keep: Annotated[
        bool, typer.Option(help="leave everything running and print the address and a token")
    ] = False,
    directory: Annotated[
        Path | None, typer.Option("--dir", help="where to build (default: a new temp dir)")
    ] = None,
    guest: Annotated[
        GuestKind, typer.Option(help="python: the quick log writer; vm: a real Linux VM under QEMU")
    ] = GuestKind.PYTHON,
    accel: Annotated[Accel, typer.Option(help="VM guests: kvm, tcg or auto (KVM if it boots)")] = Accel.AUTO,
) -> None:
    """Build a lab and run the whole DR cycle on it with every service a real process."""
    # Loaded here: the demo brings the lab's fabric and guests (start-up cost, not an import cycle).
    from siterecovery.demo.run import run_demo

    size = parse_size(disk_size)
    if guest is GuestKind.VM and size < VM_MIN_DISK_SIZE:
        typer.echo(
            "error disk-too-small: a VM guest's ext4 needs disks of at least 64 MiB (--disk-size 64M)",
            err=True,
        )
        raise typer.Exit(2)
    raise typer.Exit(run_demo(size, keep, directory, guest, accel))


app.add_typer(server_app, name="server")
app.add_typer(config_app, name="config")
app.add_typer(control.tokens_app, name="tokens")
app.add_typer(control.policies_app, name="policies")
app.add_typer(control.items_app, name="items")
app.add_typer(control.jobs_app, name="jobs")
app.add_typer(control.plans_app, name="plans")
app.add_typer(control.servers_app, name="servers")
app.add_typer(control.events_app, name="events")
app.add_typer(fabrics.fabrics_app, name="fabrics")
app.add_typer(fabrics.machines_app, name="machines")
dataplane.register(app)
app.add_typer(dr.points_app, name="points")  # importing dr also adds the DR commands to `items`
lab.register(app)


def _hoist_global_options(argv: list[str]) -> list[str]:
    """Let `--output/-o FORMAT` stand anywhere (`items list -o json`), as operators type it."""
    hoisted: list[str] = []
    rest: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("--output", "-o") and i + 1 < len(argv):
            hoisted += [arg, argv[i + 1]]
            i += 2
            continue
        if arg.startswith("--output="):
            hoisted.append(arg)
        else:
            rest.append(arg)
        i += 1
    return hoisted + rest


def main() -> None:
    import sys

    app(args=_hoist_global_options(sys.argv[1:]), prog_name="siterecovery")
