"""The FastAPI application of the configuration server."""

from __future__ import annotations

from fastapi import FastAPI

from siterecovery import __version__, portal
from siterecovery.control import metrics, openapi_errors, plan_actions, problems
from siterecovery.control.admission import HeartbeatAdmission
from siterecovery.control.api import (
    certificates,
    cluster,
    components,
    events,
    fabrics,
    item_actions,
    items,
    jobs,
    plans,
    policies,
    server,
)
from siterecovery.control.api.heartbeat_front import HeartbeatFront
from siterecovery.control.edges import Edge
from siterecovery.dr import held_failover, point_tasks
from siterecovery.dr import tasks as dr_tasks

# Task handlers register themselves on import; the job engine refuses unknown actions.
_HANDLER_MODULES = (plan_actions, dr_tasks, point_tasks, held_failover)


def create_app() -> FastAPI:
    app = FastAPI(
        title="siterecovery configuration server",
        version=__version__,
        description="Replicate, fail over, reprotect and fail back machines.",
    )
    problems.install(app)
    openapi_errors.install(app)
    # Refuses before any route reads the body (the last added is the outermost of these layers).
    app.add_middleware(Edge)
    # Answers a well-formed heartbeat from a remembered token itself; hands the rest to Edge.
    app.add_middleware(HeartbeatFront)
    # Outermost: sheds heartbeats beyond what the process handles at once, before any other work
    # (a shed heartbeat changes nothing, so refusing it before its token is checked tells nothing).
    app.add_middleware(HeartbeatAdmission)
    routers = (server, components, certificates, fabrics, policies, item_actions, items, plans, jobs, events)
    for module in (*routers, metrics):
        app.include_router(module.router)
    app.include_router(cluster.router)
    app.include_router(portal.router)

    @app.get("/healthz", tags=["server"])
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    return app
