"""Runs the configuration server: open state, start the job engine, serve the API.

Thousands of components each keep one idle HTTP connection open between heartbeats (the server's
`keep_alive_seconds` is above their keep-alive, itself above their interval), so the process holds
a file descriptor per component: it raises its soft open-files limit to the hard one at start.
The event loop shares the interpreter with the process's threads (the RPO monitor, the heartbeat
writer, worker threads): the process switches between them every millisecond, not every five
(`SWITCH_INTERVAL`), and counts the spells when its loop could not run (`server.pauses`).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import resource
import socket
import ssl
import sys

import uvicorn
from dbos import DBOS
from uvicorn.config import STARTUP_FAILURE

from siterecovery.config import LogFormat, ServerConfig
from siterecovery.control.api.warm import warm_process
from siterecovery.dr.monitor import Monitor
from siterecovery.logs import announce, route_to_root
from siterecovery.server.app import create_app
from siterecovery.server.pauses import WATCH, watch_collector
from siterecovery.store.cluster import SQLITE_EXECUTOR, Cluster, default_executor_id, set_current
from siterecovery.store.context import ControlPlane, open_control_plane
from siterecovery.store.jobs import register_job_queue

log = logging.getLogger("siterecovery.server")


def dbos_system_url(config: ServerConfig) -> str:
    # On PostgreSQL, DBOS keeps its tables in its own schema of the same database. On SQLite it
    # gets a sibling file: two writers on one SQLite file would contend for its single lock.
    if config.database_url.startswith("sqlite"):
        return f"sqlite:///{config.state_dir / 'jobs.sqlite'}"
    return config.database_url


def start_engine(cp: ControlPlane, executor_id: str = SQLITE_EXECUTOR) -> None:
    DBOS(
        config={
            "name": "siterecovery",
            "system_database_url": dbos_system_url(cp.config),
            "log_level": "WARNING",
            # Each process of a cluster runs its jobs as its own executor (see store.cluster).
            "executor_id": executor_id,
        }
    )
    DBOS.launch()
    register_job_queue()


def certificate_names(config: ServerConfig) -> tuple[str, ...]:
    """Names the HTTPS certificate covers: loopback, this host's names, the listen address, and
    `tls_names` (components verify the name they connect to)."""
    names = ["127.0.0.1", "localhost", socket.gethostname(), socket.getfqdn()]
    if config.host not in ("0.0.0.0", "::", ""):
        names.append(config.host)
    names += [n.strip() for n in config.tls_names.split(",") if n.strip()]
    return tuple(dict.fromkeys(names))


def raise_open_files_limit() -> int:
    """Raise the soft RLIMIT_NOFILE up to the hard one (a descriptor per connected component)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    # An unlimited hard limit still stops at the kernel's fs.nr_open (1,048,576 by default).
    target = 1 << 20 if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass  # kept as it was: the warning below says what it means
    if soft != resource.RLIM_INFINITY and soft < 8192:
        log.warning("open-files limit %d: at most about that many components can stay connected", soft)
    return soft


# Allocations between two young-generation collections (Python's default is 700): a heartbeat
# allocates thousands of short-lived objects, so the default collects several times per request.
GC_YOUNG_THRESHOLD = 20_000


def settle_garbage_collector() -> None:
    """Keep the collector off what lives as long as the process.

    Everything built before serving (modules, the app and its routes, models, engines: ~180,000
    objects) is never garbage, yet every full collection walked it — ~100 ms each on the 2-core
    bench box, and with thousands of connections and requests allocating, full collections come
    often (profiles charged them to whatever line allocated, e.g. the router's loop). Frozen, a
    full collection walks only what was made since."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])


# How long a thread that wants the GIL waits before the holder is made to give it up (Python's
# default is 5 ms). uvloop runs its poll without the GIL and takes it again for every callback (a
# connection's bytes, a timer, a result handed over by the heartbeat writer); while another thread
# of the process runs Python — the leader's RPO monitor pass, 0.1-0.2 s of CPU a second at 5,000
# items; a page of the item list on a worker thread — each of those callbacks waited up to 5 ms,
# so the loop got through at most ~200 of them a second and heartbeats queued behind them (the
# leader's loop lagged through most of every pass). At 1 ms it gets through five times as many.
SWITCH_INTERVAL = 0.001


def share_the_interpreter() -> None:
    """Hand the GIL over sooner (`SWITCH_INTERVAL`) and time every collection (`server.pauses`)."""
    sys.setswitchinterval(SWITCH_INTERVAL)
    watch_collector()


class _Server(uvicorn.Server):
    """uvicorn's server, with the loop-lag watch (`server.pauses`) running on its loop."""

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        lag = asyncio.get_running_loop().create_task(WATCH.watch_loop())
        try:
            await super().serve(sockets)
        finally:
            lag.cancel()


def run_uvicorn(app: object, **options: object) -> None:
    """`uvicorn.run` for one process serving an application object (no reload, no workers)."""
    config = uvicorn.Config(app, **options)  # type: ignore[arg-type]
    server = _Server(config)
    with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C: uvicorn has shut down already
        server.run()
    if not server.started:
        sys.exit(STARTUP_FAILURE)  # as `uvicorn.run` exits


def uvicorn_settings(config: ServerConfig) -> dict[str, object]:
    """The HTTP server's settings, besides TLS and logging."""
    # httptools (a dependency) parses requests in C; h11, uvicorn's fallback, in Python. uvloop (a
    # dependency) runs the event loop in C: ~15 % less server CPU per idle agent's heartbeat than
    # asyncio's loop, and its TLS transport keeps ~37 KiB per idle HTTPS connection where asyncio's
    # kept ~65 KiB even with its read buffer cut to 32 KiB (uvloop's 256 KiB buffer is malloc'd, so
    # only the pages a read fills are resident).
    return {"timeout_keep_alive": config.keep_alive_seconds, "http": "httptools", "loop": "uvloop"}


def serve(config: ServerConfig, admin_token_file: str | None = None) -> None:
    cp = open_control_plane(config)
    if cp.initial_admin_token:
        if admin_token_file:
            import os

            fd = os.open(admin_token_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(cp.initial_admin_token + "\n")
        announce(log.name, config.log_format, f"initial admin token (shown once): {cp.initial_admin_token}")
    app = create_app()
    cluster = Cluster(cp.db, default_executor_id(config.listen), config.state_dir)
    cluster.join()
    set_current(cluster)
    start_engine(cp, cluster.executor_id)
    Monitor(cp, cluster=cluster).start()
    raise_open_files_limit()
    uvicorn_options = uvicorn_settings(config)
    if config.tls:
        pki = config.state_dir / "pki"
        issued = cp.ca.issue("configuration-server", certificate_names(config))
        cert, key, _ = issued.write(pki, "server")
        uvicorn_options |= {"ssl_certfile": str(cert), "ssl_keyfile": str(key)}
        uvicorn_options["ssl_cert_reqs"] = ssl.CERT_NONE
    if config.log_format is LogFormat.JSON:
        # uvicorn then leaves logging alone, and DBOS's text handler goes: one format on stderr.
        uvicorn_options["log_config"] = None
        route_to_root("dbos", "uvicorn", "uvicorn.error", "uvicorn.access")
    # Every registered component's token, kind and desired state before the first request: after a
    # restart, thousands of first heartbeats would otherwise each take the slow way at once.
    warm_process(cp)
    log.info("serving on %s", config.listen)
    settle_garbage_collector()
    share_the_interpreter()
    run_uvicorn(app, host=config.host, port=config.port, log_level="warning", **uvicorn_options)
