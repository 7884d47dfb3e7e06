"""The data-plane service commands: `agent`, `process-server`, `master-target`, `diagnose connectivity`.

Each service registers with the configuration server (or runs from `--assignments FILE` with a
certificate already in its state directory), writes its data listener's address to
`<state_dir>/address`, and reconciles/heartbeats every `--interval` seconds until SIGTERM or
SIGINT. On SIGTERM the agent first drains its spools to the process server (`--drain-timeout`).
Run alone: `python -m siterecovery.cli.dataplane --help`.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Annotated, TypeVar

import httpx
import typer

from siterecovery.config import (
    ENV_PREFIX,
    AgentSettings,
    LogFormat,
    LogLevel,
    MasterTargetSettings,
    ProcessServerSettings,
    ServiceSettings,
    load_settings,
)
from siterecovery.errors import SiteRecoveryError
from siterecovery.logs import configure_logging
from siterecovery.retry import Backoff

if TYPE_CHECKING:
    from siterecovery.dataplane.control_client import ControlClient, Registration
    from siterecovery.dataplane.links import Identity

S = TypeVar("S", bound=ServiceSettings)
T = TypeVar("T")

# Every option defaults to None, meaning "not given": the service's settings (siterecovery.config)
# then take the SITERECOVERY_* variable, the configuration file or the default, in that order.
ServerOpt = Annotated[
    str | None, typer.Option("--server", help="configuration server URL [env SITERECOVERY_SERVER]")
]
CaOpt = Annotated[
    Path | None,
    typer.Option(
        "--ca-file",
        help="CA the configuration server's HTTPS certificate must chain to (else trust on first use)",
    ),
]
PassOpt = Annotated[Path | None, typer.Option("--passphrase-file", help="file holding the passphrase")]
IntervalOpt = Annotated[
    float | None,
    typer.Option("--interval", help="seconds between heartbeats while idle [agent 10, others 5]"),
]
SiteOpt = Annotated[str | None, typer.Option("--site", help="[onprem]")]
AssignmentsOpt = Annotated[Path | None, typer.Option("--assignments", help="desired-state JSON")]
ConfigOpt = Annotated[
    Path | None,
    typer.Option("--config", help="TOML settings file [env SITERECOVERY_CONFIG]", show_default=False),
]
LogFormatOpt = Annotated[LogFormat | None, typer.Option("--log-format", help="text or json [text]")]
LogLevelOpt = Annotated[LogLevel | None, typer.Option("--log-level", help="[INFO]")]


def _settings(cls: type[S], config: Path | None, **flags: object) -> S:
    """The service's effective settings (flags > env > file > defaults), logging set up from them."""
    try:
        settings = load_settings(cls, flags, config).settings
    except SiteRecoveryError as exc:
        raise _fail(exc) from exc
    configure_logging(settings.log_level, settings.log_format)
    return settings


def _required(value: T | None, flag: str) -> T:
    if value is None:
        raise typer.BadParameter(f"{flag} is required (or its setting in the environment or the file)")
    return value


def _stop_event() -> threading.Event:
    stop = threading.Event()

    def handler(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    return stop


def _fail(exc: SiteRecoveryError) -> typer.Exit:
    for p in exc.problems:
        typer.echo(f"error [{p.code}]: {p.message}. {p.remediation}", err=True)
    return typer.Exit(2)


def _client(
    server: str | None, state_dir: Path, reg: Registration, ca_file: Path | None
) -> ControlClient | None:
    # The data plane's modules load only when a service command runs (start-up cost of the CLI).
    from siterecovery.dataplane.control_client import ControlClient

    return ControlClient(server, state_dir, reg, ca_file) if server else None


def _write_address(state_dir: Path, address: str) -> None:
    # Replaced whole: a reader (an operator's script, the lab) never sees the file empty.
    tmp = state_dir / "address.tmp"
    tmp.write_text(address + "\n")
    os.replace(tmp, state_dir / "address")


def agent(
    machine: Annotated[str | None, typer.Option("--machine", help="name of the protected machine")] = None,
    server: ServerOpt = None,
    ca_file: CaOpt = None,
    passphrase_file: PassOpt = None,
    disk: Annotated[list[str] | None, typer.Option("--disk", help="LABEL=PATH of a local disk")] = None,
    nbd_unix_dir: Annotated[Path | None, typer.Option("--nbd-unix-dir")] = None,
    nbd_listen: Annotated[str | None, typer.Option("--nbd-listen", help="H:P for NBD over TCP")] = None,
    state_dir: Annotated[Path | None, typer.Option("--state-dir", help="[agent-state]")] = None,
    assignments: AssignmentsOpt = None,
    spool_limit: Annotated[int | None, typer.Option("--spool-limit", help="bytes [1 GiB]")] = None,
    drain_timeout: Annotated[float | None, typer.Option("--drain-timeout", help="seconds [30]")] = None,
    site: SiteOpt = None,
    interval: IntervalOpt = None,
    registration_delay: Annotated[
        float | None,
        typer.Option("--registration-delay", help="seconds after start before registering (AG-1) [0]"),
    ] = None,
    freeze_hook: Annotated[
        str | None, typer.Option("--freeze-hook", help="shell command quiescing the machine (app bookmarks)")
    ] = None,
    thaw_hook: Annotated[str | None, typer.Option("--thaw-hook", help="shell command thawing it")] = None,
    config: ConfigOpt = None,
    log_format: LogFormatOpt = None,
    log_level: LogLevelOpt = None,
) -> None:
    """Export disks over NBD and replicate their writes to a process server."""
    # Loaded when the command runs, not at the top: every other command would pay for it at
    # start-up (start-up cost, not an import cycle).
    from siterecovery.dataplane.agent import Agent, AgentOptions
    from siterecovery.dataplane.assignments import AgentDesired, PairState
    from siterecovery.dataplane.control_client import DesiredSource, Registration
    from siterecovery.dataplane.links import Identity, parse_address

    cfg = _settings(
        AgentSettings,
        config,
        machine=machine,
        server=server,
        ca_file=ca_file,
        passphrase_file=passphrase_file,
        disks=disk,
        nbd_unix_dir=nbd_unix_dir,
        nbd_listen=nbd_listen,
        state_dir=state_dir,
        assignments=assignments,
        spool_limit=spool_limit,
        drain_timeout=drain_timeout,
        site=site,
        interval=interval,
        registration_delay=registration_delay,
        freeze_hook=freeze_hook,
        thaw_hook=thaw_hook,
        log_format=log_format,
        log_level=log_level,
    )
    name = _required(cfg.machine, "--machine")
    state = cfg.state_dir
    state.mkdir(parents=True, exist_ok=True)
    disks = {}
    for item in cfg.disks:
        label, _, path = item.partition("=")
        disks[label] = Path(path)
    # Named by site too: a failed-over machine keeps its name in the cloud.
    client = _client(
        cfg.server, state, Registration("agent", f"{cfg.site}/{name}", cfg.site, machine=name), cfg.ca_file
    )
    stop = _stop_event()
    nbd_tcp = parse_address(cfg.nbd_listen) if cfg.nbd_listen else None
    options = AgentOptions(
        state,
        disks,
        cfg.nbd_unix_dir,
        nbd_tcp,
        cfg.spool_limit,
        f"agent-{name}",
        machine=name,
        freeze_hook=cfg.freeze_hook,
        thaw_hook=cfg.thaw_hook,
        spare_sender=True,
    )
    # A certificate from an earlier registration lets the resumed pairs send at once.
    known = Identity.in_dir(state)
    svc = Agent(options, known if known.exists() else None)
    identity: Identity | None = None
    try:
        # The pairs of the last run capture before the disks are served; registration follows
        # after the delay (AG-1), and a configuration server that is away changes neither.
        svc.start()
        if client is not None:
            stop.wait(cfg.registration_delay)
        identity = _register_until_stopped(state, client, cfg.passphrase_file, stop)
        if identity is not None:
            svc.set_identity(identity)
            source = DesiredSource(AgentDesired, state, client, cfg.assignments)
            while not stop.is_set():
                stats = svc.stats()
                desired = source.exchange(stats)
                if source.known:  # else keep the resumed pairs rather than retire them
                    svc.reconcile(desired)
                syncing = any(p.state is not PairState.PROTECTED for p in stats.pairs)
                stop.wait(source.pace(cfg.interval, busy=syncing))
    except SiteRecoveryError as exc:
        svc.stop()
        raise _fail(exc) from exc
    svc.stop(cfg.drain_timeout)
    if identity is not None:
        source.exchange(svc.stats())  # the final statistics: what was drained before exit


def _register_until_stopped(
    state_dir: Path,
    client: ControlClient | None,
    passphrase_file: Path | None,
    stop: threading.Event,
    backoff: Backoff | None = None,
) -> Identity | None:
    """Register, retrying while the configuration server is unreachable; None if stopped first."""
    # Jittered: agents that found the server away at the same moment do not all return at once.
    from siterecovery.dataplane.control_client import load_identity  # start-up cost, as above

    backoff = backoff or Backoff(1.0, 30.0)
    while not stop.is_set():
        try:
            return load_identity(state_dir, client, passphrase_file)
        except httpx.HTTPError as exc:
            delay = backoff.next()
            logging.getLogger(__name__).warning("registration failed (%s); retrying in %.1f s", exc, delay)
            stop.wait(delay)
    return None


# Binds a process server or master target to the VM it runs in (RP-VCENTER, MT checks): the
# name alone was the only way before, so a component had to be named after its VM.
MachineOpt = Annotated[
    str | None, typer.Option("--machine", help="the VM this runs in (default: the master target's name)")
]


def process_server(
    cache_dir: Annotated[Path | None, typer.Option("--cache-dir", help="required")] = None,
    server: ServerOpt = None,
    ca_file: CaOpt = None,
    passphrase_file: PassOpt = None,
    listen: Annotated[str | None, typer.Option("--listen", help="[127.0.0.1:9443]")] = None,
    site: SiteOpt = None,
    name: Annotated[str | None, typer.Option("--name", help="[process-server]")] = None,
    machine: MachineOpt = None,
    state_dir: Annotated[Path | None, typer.Option("--state-dir", help="default: the cache dir")] = None,
    assignments: AssignmentsOpt = None,
    interval: IntervalOpt = None,
    config: ConfigOpt = None,
    log_format: LogFormatOpt = None,
    log_level: LogLevelOpt = None,
) -> None:
    """Receive agents' frames, cache them durably and forward them to master targets (PS-1)."""
    # Loaded when the command runs: start-up cost of every other command (not an import cycle).
    from siterecovery.dataplane.assignments import ProcessServerDesired
    from siterecovery.dataplane.control_client import DesiredSource, Registration, load_identity
    from siterecovery.dataplane.process_server import ProcessServer

    cfg = _settings(
        ProcessServerSettings,
        config,
        cache_dir=cache_dir,
        server=server,
        ca_file=ca_file,
        passphrase_file=passphrase_file,
        listen=listen,
        site=site,
        name=name,
        machine=machine,
        state_dir=state_dir,
        assignments=assignments,
        interval=interval,
        log_format=log_format,
        log_level=log_level,
    )
    cache = _required(cfg.cache_dir, "--cache-dir")
    state = cfg.state_dir or cache
    state.mkdir(parents=True, exist_ok=True)
    reg = Registration("process-server", cfg.name, cfg.site, address=cfg.listen, machine=cfg.machine)
    client = _client(cfg.server, state, reg, cfg.ca_file)
    stop = _stop_event()
    try:
        identity = load_identity(state, client, cfg.passphrase_file)
    except SiteRecoveryError as exc:
        raise _fail(exc) from exc
    svc = ProcessServer(cache / "cache", identity, cfg.listen, cfg.name)
    svc.start()
    _write_address(state, svc.address)
    if client is not None:
        client.address = svc.address
    source = DesiredSource(ProcessServerDesired, state, client, cfg.assignments)
    while not stop.is_set():
        svc.reconcile(source.exchange(svc.stats()))
        stop.wait(source.pace(cfg.interval))
    svc.stop()


def master_target(
    os_type: Annotated[str | None, typer.Option("--os", help="linux or windows (MT-2); required")] = None,
    retention_volume: Annotated[
        Path | None,
        typer.Option("--retention-volume", help="journals go here unless the desired state names one"),
    ] = None,
    volume: Annotated[
        list[Path] | None, typer.Option("--volume", help="another candidate retention volume (RP-RET)")
    ] = None,
    retention_quota: Annotated[
        int | None, typer.Option("--retention-quota", help="bytes per pair's journal (testing)", hidden=True)
    ] = None,
    page_blob_container: Annotated[
        str | None,
        typer.Option(
            "--page-blob-container",
            help="target disks are page blobs in this container"
            f" (connection string in ${ENV_PREFIX}AZURE_STORAGE)",
        ),
    ] = None,
    datastore: Annotated[
        list[str] | None,
        typer.Option(
            "--datastore", help="NAME=DIR: a datastore mounted here; its disks are written as VMDKs"
        ),
    ] = None,
    server: ServerOpt = None,
    ca_file: CaOpt = None,
    passphrase_file: PassOpt = None,
    listen: Annotated[str | None, typer.Option("--listen", help="[127.0.0.1:9444]")] = None,
    advertise: Annotated[
        str | None,
        typer.Option(
            "--advertise", help="host:port process servers connect to, if not --listen (NAT, a relay)"
        ),
    ] = None,
    site: SiteOpt = None,
    name: Annotated[str | None, typer.Option("--name", help="[master-target]")] = None,
    machine: MachineOpt = None,
    state_dir: Annotated[Path | None, typer.Option("--state-dir", help="[master-target-state]")] = None,
    assignments: AssignmentsOpt = None,
    interval: IntervalOpt = None,
    config: ConfigOpt = None,
    log_format: LogFormatOpt = None,
    log_level: LogLevelOpt = None,
) -> None:
    """Apply replicated writes to attached target disks through retention journals (MT-1)."""
    # Loaded when the command runs: the Azure SDK (page blobs) alone costs every other command
    # a third of a second at start-up (start-up cost, not an import cycle).
    from siterecovery.dataplane.assignments import MasterTargetDesired
    from siterecovery.dataplane.control_client import DesiredSource, Registration, load_identity
    from siterecovery.dataplane.master_target import MasterTarget
    from siterecovery.dataplane.page_blob import page_blob_factory
    from siterecovery.dataplane.vmdk import DatastoreMounts

    cfg = _settings(
        MasterTargetSettings,
        config,
        os_type=os_type,
        retention_volume=retention_volume,
        volumes=volume,
        retention_quota=retention_quota,
        page_blob_container=page_blob_container,
        datastores=datastore,
        server=server,
        ca_file=ca_file,
        passphrase_file=passphrase_file,
        listen=listen,
        advertise=advertise,
        site=site,
        name=name,
        machine=machine,
        state_dir=state_dir,
        assignments=assignments,
        interval=interval,
        log_format=log_format,
        log_level=log_level,
    )
    if cfg.os_type not in ("linux", "windows"):
        raise typer.BadParameter("--os must be linux or windows")
    state = cfg.state_dir
    state.mkdir(parents=True, exist_ok=True)
    if cfg.retention_volume is not None:
        cfg.retention_volume.mkdir(parents=True, exist_ok=True)
    reg = Registration(
        "master-target",
        cfg.name,
        cfg.site,
        os_type=cfg.os_type,
        address=cfg.advertise or cfg.listen,
        machine=cfg.machine,
    )
    client = _client(cfg.server, state, reg, cfg.ca_file)
    stop = _stop_event()
    try:
        identity = load_identity(state, client, cfg.passphrase_file)
        connection = cfg.azure_storage.get_secret_value() if cfg.azure_storage is not None else None
        factory = page_blob_factory(cfg.page_blob_container, connection)
        mounts = DatastoreMounts.parse(cfg.datastores)
    except SiteRecoveryError as exc:
        raise _fail(exc) from exc
    svc = MasterTarget(
        state,
        identity,
        cfg.listen,
        retention_volume=cfg.retention_volume,
        volumes=tuple(cfg.volumes),
        retention_quota=cfg.retention_quota,
        name=cfg.name,
        applier_factory=factory,
        place=mounts.place if mounts.mounts else None,
    )
    source = DesiredSource(MasterTargetDesired, state, client, cfg.assignments)
    try:
        svc.reconcile(source.exchange(svc.stats()))
        svc.start()
        _write_address(state, svc.address)
        if client is not None:
            client.address = cfg.advertise or svc.address
        while not stop.is_set():
            stop.wait(source.pace(cfg.interval))
            svc.reconcile(source.exchange(svc.stats()))
    except SiteRecoveryError as exc:
        svc.stop()
        raise _fail(exc) from exc
    svc.stop()


def connectivity(
    server: Annotated[
        str, typer.Option("--server", envvar="SITERECOVERY_SERVER", help="configuration server URL")
    ],
    token: Annotated[str | None, typer.Option("--token", envvar="SITERECOVERY_TOKEN")] = None,
    process_server: Annotated[
        str | None, typer.Option("--process-server", help="the process server to judge (default: all)")
    ] = None,
) -> None:
    """PS-3: TCP reachability of the configuration server's API port, then process servers' heartbeat ages.

    What an operator would do with telnet and ping, from where this command runs: exit 1 when the
    API port is unreachable or a process server has no recent heartbeat.
    """
    url = httpx.URL(server)
    port = url.port or (443 if url.scheme == "https" else 80)
    start = time.monotonic()
    try:
        with socket.create_connection((url.host, port), timeout=5):
            typer.echo(f"tcp {url.host}:{port}: reachable in {1000 * (time.monotonic() - start):.1f} ms")
    except OSError as exc:
        typer.echo(f"tcp {url.host}:{port}: unreachable ({exc})", err=True)
        raise typer.Exit(1) from exc
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    resp = httpx.get(f"{server.rstrip('/')}/api/servers", headers=headers, timeout=10)
    if resp.status_code != 200:
        typer.echo(f"GET /api/servers: HTTP {resp.status_code} (a reader token is enough)", err=True)
        raise typer.Exit(1)
    servers = [s for s in resp.json() if s.get("kind") == "process-server"]
    if process_server is not None:
        servers = [s for s in servers if process_server in (s.get("name"), s.get("id"))]
        if not servers:
            typer.echo(f"process server {process_server!r} is not registered", err=True)
            raise typer.Exit(1)
    healthy = True
    for s in servers:
        age = s.get("heartbeat_age_seconds")
        seen = "never" if age is None else f"{float(age):.1f} s ago"
        state = "connected" if s.get("connected") else "DISCONNECTED"
        healthy = healthy and bool(s.get("connected"))
        typer.echo(f"process server {s.get('name')} ({s.get('site')}): last heartbeat {seen}: {state}")
    if not healthy:
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    """Add the data-plane commands to the `siterecovery` CLI."""
    app.command("agent")(agent)
    app.command("process-server")(process_server)
    app.command("master-target")(master_target)
    diagnose = typer.Typer(help="Diagnose the data plane.")
    diagnose.command("connectivity")(connectivity)
    app.add_typer(diagnose, name="diagnose")


if __name__ == "__main__":
    standalone = typer.Typer(help="siterecovery data plane")
    register(standalone)
    standalone()
