"""What a heartbeat changes: liveness, reported statistics, health and alerts.

Process servers report their cache; below 30 % free the server turns warning, below 25 %
critical (PS-1/PS-2), and an alert stays open until the cache recovers.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session

from siterecovery.config import ServerConfig
from siterecovery.control.schemas import ServerOut
from siterecovery.dr.desired import desired_for
from siterecovery.store.events import clear_alert, raise_alert, record_event
from siterecovery.store.models import Component, heartbeat_age, now
from siterecovery.store.points import with_points
from siterecovery.store.states import ComponentKind, Health, Severity

CACHE_WARNING_FREE = 0.30
CACHE_CRITICAL_FREE = 0.25
CACHE_ALERT = "ps-cache-low"
RETENTION_ALERT = "retention-volume-full"
# The alerts a heartbeat raises and clears (on its component).
COMPONENT_ALERTS = (CACHE_ALERT, RETENTION_ALERT)


def cache_health(stats: dict[str, Any]) -> Health:
    capacity = float(stats.get("cache_capacity_bytes") or 0)
    used = float(stats.get("cache_used_bytes") or 0)
    if capacity <= 0:
        return Health.NORMAL
    free = 1.0 - used / capacity
    if free < CACHE_CRITICAL_FREE:
        return Health.CRITICAL
    if free < CACHE_WARNING_FREE:
        return Health.WARNING
    return Health.NORMAL


def record_refusals(s: Session, row: Component, previous: dict[str, Any], stats: dict[str, Any]) -> None:
    """An event for each peer a hop refused since its last heartbeat (issue 13: naming the peer)."""

    def refusals(doc: dict[str, Any]) -> list[dict[str, Any]]:
        items = doc.get("refused_peers")
        return [r for r in items if isinstance(r, dict)] if isinstance(items, list) else []

    seen = {(r.get("number"), r.get("time")) for r in refusals(previous)}
    for r in refusals(stats):
        if (r.get("number"), r.get("time")) in seen:
            continue
        record_event(
            s,
            Severity.WARNING,
            "peer-refused",
            f"{row.kind} {row.name} refused {r.get('peer')} from {r.get('address')}"
            f"{' for pair ' + str(r.get('pair_id')) if r.get('pair_id') else ''}: "
            f"{r.get('code')}: {r.get('message')}",
            "component",
            row.id,
        )


def apply_heartbeat(
    s: Session, row: Component, stats: dict[str, Any], config: ServerConfig
) -> dict[str, Any]:
    """Record a heartbeat and return the component's desired state, in one session."""
    record_heartbeat(s, row, stats, config)
    return desired_for(s, row)


def record_heartbeat(
    s: Session,
    row: Component,
    stats: dict[str, Any],
    config: ServerConfig,
    open_alerts: set[str] | None = None,
    store_stats: bool = True,
) -> None:
    """What a heartbeat writes: liveness, statistics, health and alerts (see `heartbeat_writer`).

    `open_alerts`, when given, are the codes of this component's active alerts, read for a whole
    batch of reports at once: an alert is then cleared only when one is open (most heartbeats of a
    healthy process server or master target look for nothing). With `store_stats` false the
    caller writes `stats` itself (the writer, one statement for a batch).
    """
    row.last_heartbeat = now()
    record_refusals(s, row, row.stats or {}, stats)
    if store_stats:
        row.stats = stats

    def clear(code: str) -> None:
        if open_alerts is None or code in open_alerts:
            clear_alert(s, code, "component", row.id)
            if open_alerts is not None:
                open_alerts.discard(code)

    def opened(code: str) -> None:  # the same component's next report in this batch may clear it
        if open_alerts is not None:
            open_alerts.add(code)

    if row.kind == ComponentKind.PROCESS:
        health = cache_health(stats)
        row.health = health
        if health is Health.NORMAL:
            clear(CACHE_ALERT)
        else:
            severity = Severity.CRITICAL if health is Health.CRITICAL else Severity.WARNING
            raise_alert(
                s,
                severity,
                CACHE_ALERT,
                f"Process server {row.name} cache is {health.value}: "
                f"{stats.get('cache_used_bytes', 0)} of {stats.get('cache_capacity_bytes', 0)} bytes used.",
                "component",
                row.id,
            )
            opened(CACHE_ALERT)
    elif row.kind == ComponentKind.MASTER_TARGET and stats.get("retention_full"):
        row.health = Health.CRITICAL
        raise_alert(
            s,
            Severity.CRITICAL,
            RETENTION_ALERT,
            f"Master target {row.name}: retention volume is full; applying is paused.",
            "component",
            row.id,
        )
        opened(RETENTION_ALERT)
    elif row.kind == ComponentKind.MASTER_TARGET:
        row.health = Health.NORMAL
        clear(RETENTION_ALERT)


def is_connected(row: Component, config: ServerConfig) -> bool:
    if row.kind == ComponentKind.CONFIGURATION:
        return True
    age = heartbeat_age(row)
    return age is not None and age <= config.heartbeat_timeout


def server_view(s: Session, row: Component, config: ServerConfig) -> ServerOut:
    if row.kind == ComponentKind.CONFIGURATION:
        row.last_heartbeat = now()
    return ServerOut(
        id=row.id,
        kind=ComponentKind(row.kind),
        name=row.name,
        site=row.site,
        os_type=row.os_type,
        address=row.address,
        machine=row.machine,
        health=row.health,
        connected=is_connected(row, config),
        heartbeat_age_seconds=heartbeat_age(row),
        registered_at=row.registered_at,
        stats=with_points(s, row),  # a master target's points as it reported them
    )
