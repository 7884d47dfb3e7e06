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
    # Sheds heartbeats beyond what the process handles at once (inside Edge: auth is checked first).
    app.add_middleware(HeartbeatAdmission)
    # Outermost of the application's own layers: refuses before any route reads the body.
    app.add_middleware(Edge)
    routers = (server, components, certificates, fabrics, policies, item_actions, items, plans, jobs, events)
    for module in (*routers, metrics):
        app.include_router(module.router)
    app.include_router(cluster.router)
    app.include_router(portal.router)

    @app.get("/healthz", tags=["server"])
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    return app
