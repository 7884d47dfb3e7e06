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
from typing import Annotated

import httpx
import typer

from siterecovery.dataplane.agent import Agent, AgentOptions
from siterecovery.dataplane.assignments import (
    AgentDesired,
    MasterTargetDesired,
    PairState,
    ProcessServerDesired,
)
from siterecovery.dataplane.control_client import (
    ControlClient,
    DesiredSource,
    Registration,
    load_identity,
)
from siterecovery.dataplane.links import Identity, parse_address
from siterecovery.dataplane.master_target import MasterTarget
from siterecovery.dataplane.page_blob import CONNECTION_ENV, page_blob_factory
from siterecovery.dataplane.process_server import ProcessServer
from siterecovery.dataplane.replica import DEFAULT_SPOOL_LIMIT
from siterecovery.dataplane.vmdk import DatastoreMounts
from siterecovery.errors import SiteRecoveryError

ServerOpt = Annotated[
    str | None, typer.Option("--server", envvar="SITERECOVERY_SERVER", help="configuration server URL")
]
CaOpt = Annotated[
    Path | None,
    typer.Option(
        "--ca-file",
        envvar="SITERECOVERY_CA_FILE",
        help="CA the configuration server's HTTPS certificate must chain to (else trust on first use)",
    ),
]
PassOpt = Annotated[Path | None, typer.Option("--passphrase-file", help="file holding the passphrase")]
IntervalOpt = Annotated[
    float,
    typer.Option(
        "--interval",
        envvar="SITERECOVERY_HEARTBEAT_INTERVAL",
        help="seconds between heartbeats while idle (2 s while something changes; docs/operations.md)",
    ),
]
# Idle heartbeat intervals (docs/operations.md, "Heartbeat intervals"): an agent's report feeds
# RPO and liveness (timeout 30 s), a process server's and master target's feed every item's RPO.
AGENT_INTERVAL = 10.0
SERVER_INTERVAL = 5.0


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
    return ControlClient(server, state_dir, reg, ca_file) if server else None


def _write_address(state_dir: Path, address: str) -> None:
    # Replaced whole: a reader (an operator's script, the lab) never sees the file empty.
    tmp = state_dir / "address.tmp"
    tmp.write_text(address + "\n")
    os.replace(tmp, state_dir / "address")


def agent(
    machine: Annotated[str, typer.Option("--machine", help="name of the protected machine")],
    server: ServerOpt = None,
    ca_file: CaOpt = None,
    passphrase_file: PassOpt = None,
    disk: Annotated[list[str] | None, typer.Option("--disk", help="LABEL=PATH of a local disk")] = None,
    nbd_unix_dir: Annotated[Path | None, typer.Option("--nbd-unix-dir")] = None,
    nbd_listen: Annotated[str | None, typer.Option("--nbd-listen", help="H:P for NBD over TCP")] = None,
    state_dir: Annotated[Path, typer.Option("--state-dir")] = Path("agent-state"),
    assignments: Annotated[Path | None, typer.Option("--assignments", help="desired-state JSON")] = None,
    spool_limit: Annotated[int, typer.Option("--spool-limit", help="bytes")] = DEFAULT_SPOOL_LIMIT,
    drain_timeout: Annotated[float, typer.Option("--drain-timeout", help="seconds")] = 30.0,
    site: Annotated[str, typer.Option("--site")] = "onprem",
    interval: IntervalOpt = AGENT_INTERVAL,
    registration_delay: Annotated[
        float, typer.Option("--registration-delay", help="seconds after start before registering (AG-1)")
    ] = 0.0,
    freeze_hook: Annotated[
        str | None, typer.Option("--freeze-hook", help="shell command quiescing the machine (app bookmarks)")
    ] = None,
    thaw_hook: Annotated[str | None, typer.Option("--thaw-hook", help="shell command thawing it")] = None,
) -> None:
    """Export disks over NBD and replicate their writes to a process server."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    state_dir.mkdir(parents=True, exist_ok=True)
    disks = {}
    for item in disk or []:
        label, _, path = item.partition("=")
        disks[label] = Path(path)
    # Named by site too: a failed-over machine keeps its name in the cloud.
    client = _client(
        server, state_dir, Registration("agent", f"{site}/{machine}", site, machine=machine), ca_file
    )
    stop = _stop_event()
    nbd_tcp = parse_address(nbd_listen) if nbd_listen else None
    options = AgentOptions(
        state_dir,
        disks,
        nbd_unix_dir,
        nbd_tcp,
        spool_limit,
        f"agent-{machine}",
        machine=machine,
        freeze_hook=freeze_hook,
        thaw_hook=thaw_hook,
    )
    # A certificate from an earlier registration lets the resumed pairs send at once.
    known = Identity.in_dir(state_dir)
    svc = Agent(options, known if known.exists() else None)
    identity: Identity | None = None
    try:
        # The pairs of the last run capture before the disks are served; registration follows
        # after the delay (AG-1), and a configuration server that is away changes neither.
        svc.start()
        if client is not None:
            stop.wait(registration_delay)
        identity = _register_until_stopped(state_dir, client, passphrase_file, stop)
        if identity is not None:
            svc.set_identity(identity)
            source = DesiredSource(AgentDesired, state_dir, client, assignments)
            while not stop.is_set():
                stats = svc.stats()
                desired = source.exchange(stats)
                if source.known:  # else keep the resumed pairs rather than retire them
                    svc.reconcile(desired)
                syncing = any(p.state is not PairState.PROTECTED for p in stats.pairs)
                stop.wait(source.pace(interval, busy=syncing))
    except SiteRecoveryError as exc:
        svc.stop()
        raise _fail(exc) from exc
    svc.stop(drain_timeout)
    if identity is not None:
        source.exchange(svc.stats())  # the final statistics: what was drained before exit


def _register_until_stopped(
    state_dir: Path, client: ControlClient | None, passphrase_file: Path | None, stop: threading.Event
) -> Identity | None:
    """Register, retrying while the configuration server is unreachable; None if stopped first."""
    delay = 1.0
    while not stop.is_set():
        try:
            return load_identity(state_dir, client, passphrase_file)
        except httpx.HTTPError as exc:
            logging.getLogger(__name__).warning("registration failed (%s); retrying in %.0f s", exc, delay)
            stop.wait(delay)
            delay = min(delay * 2, 30.0)
    return None


# Binds a process server or master target to the VM it runs in (RP-VCENTER, MT checks): the
# name alone was the only way before, so a component had to be named after its VM.
MachineOpt = Annotated[
    str | None, typer.Option("--machine", help="the VM this runs in (default: the master target's name)")
]


def process_server(
    cache_dir: Annotated[Path, typer.Option("--cache-dir")],
    server: ServerOpt = None,
    ca_file: CaOpt = None,
    passphrase_file: PassOpt = None,
    listen: Annotated[str, typer.Option("--listen")] = "127.0.0.1:9443",
    site: Annotated[str, typer.Option("--site")] = "onprem",
    name: Annotated[str, typer.Option("--name")] = "process-server",
    machine: MachineOpt = None,
    state_dir: Annotated[Path | None, typer.Option("--state-dir", help="default: the cache dir")] = None,
    assignments: Annotated[Path | None, typer.Option("--assignments", help="desired-state JSON")] = None,
    interval: IntervalOpt = SERVER_INTERVAL,
) -> None:
    """Receive agents' frames, cache them durably and forward them to master targets (PS-1)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    state = state_dir or cache_dir
    state.mkdir(parents=True, exist_ok=True)
    client = _client(
        server, state, Registration("process-server", name, site, address=listen, machine=machine), ca_file
    )
    stop = _stop_event()
    try:
        identity = load_identity(state, client, passphrase_file)
    except SiteRecoveryError as exc:
        raise _fail(exc) from exc
    svc = ProcessServer(cache_dir / "cache", identity, listen, name)
    svc.start()
    _write_address(state, svc.address)
    if client is not None:
        client.address = svc.address
    source = DesiredSource(ProcessServerDesired, state, client, assignments)
    while not stop.is_set():
        svc.reconcile(source.exchange(svc.stats()))
        stop.wait(source.pace(interval))
    svc.stop()


def master_target(
    os_type: Annotated[str, typer.Option("--os", help="linux or windows (MT-2)")],
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
            help=f"target disks are page blobs in this container (connection string in ${CONNECTION_ENV})",
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
    listen: Annotated[str, typer.Option("--listen")] = "127.0.0.1:9444",
    advertise: Annotated[
        str | None,
        typer.Option(
            "--advertise", help="host:port process servers connect to, if not --listen (NAT, a relay)"
        ),
    ] = None,
    site: Annotated[str, typer.Option("--site")] = "onprem",
    name: Annotated[str, typer.Option("--name")] = "master-target",
    machine: MachineOpt = None,
    state_dir: Annotated[Path, typer.Option("--state-dir")] = Path("master-target-state"),
    assignments: Annotated[Path | None, typer.Option("--assignments", help="desired-state JSON")] = None,
    interval: IntervalOpt = SERVER_INTERVAL,
) -> None:
    """Apply replicated writes to attached target disks through retention journals (MT-1)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if os_type not in ("linux", "windows"):
        raise typer.BadParameter("--os must be linux or windows")
    state_dir.mkdir(parents=True, exist_ok=True)
    if retention_volume is not None:
        retention_volume.mkdir(parents=True, exist_ok=True)
    client = _client(
        server,
        state_dir,
        Registration(
            "master-target", name, site, os_type=os_type, address=advertise or listen, machine=machine
        ),
        ca_file,
    )
    stop = _stop_event()
    try:
        identity = load_identity(state_dir, client, passphrase_file)
        factory = page_blob_factory(page_blob_container)
        mounts = DatastoreMounts.parse(datastore or [])
    except SiteRecoveryError as exc:
        raise _fail(exc) from exc
    svc = MasterTarget(
        state_dir,
        identity,
        listen,
        retention_volume=retention_volume,
        volumes=tuple(volume or ()),
        retention_quota=retention_quota,
        name=name,
        applier_factory=factory,
        place=mounts.place if mounts.mounts else None,
    )
    source = DesiredSource(MasterTargetDesired, state_dir, client, assignments)
    try:
        svc.reconcile(source.exchange(svc.stats()))
        svc.start()
        _write_address(state_dir, svc.address)
        if client is not None:
            client.address = advertise or svc.address
        while not stop.is_set():
            stop.wait(source.pace(interval))
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
