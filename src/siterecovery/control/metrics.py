"""Prometheus `/metrics`: RPO and health per item, process-server cache, master targets, jobs, alerts.

Values are read from the database at scrape time by a custom collector, so the exposition is
always the current state and no metric object needs updating anywhere else.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator

from fastapi import APIRouter
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import select

from siterecovery.control.reports import entries, number
from siterecovery.store.context import current
from siterecovery.store.models import Component, Event, Job, ReplicatedItem
from siterecovery.store.states import ComponentKind

router = APIRouter(tags=["metrics"])
_HEALTH = {"normal": 0, "warning": 1, "critical": 2}


class StateCollector(Collector):
    def collect(self) -> Iterator[GaugeMetricFamily]:
        rpo = GaugeMetricFamily(
            "siterecovery_item_rpo_seconds", "Current RPO of a replicated item", labels=["item"]
        )
        health = GaugeMetricFamily(
            "siterecovery_item_health", "0 normal, 1 warning, 2 critical", labels=["item"]
        )
        cache = GaugeMetricFamily(
            "siterecovery_process_server_cache_used_bytes", "Disk cache in use", labels=["server"]
        )
        capacity = GaugeMetricFamily(
            "siterecovery_process_server_cache_capacity_bytes", "Disk cache size", labels=["server"]
        )
        throughput = GaugeMetricFamily(
            "siterecovery_process_server_throughput_bytes_per_second",
            "Forwarding throughput",
            labels=["server"],
        )
        disks = GaugeMetricFamily(
            "siterecovery_master_target_attached_disks", "Disks attached (max 60)", labels=["server"]
        )
        journal = GaugeMetricFamily(
            "siterecovery_master_target_journal_bytes", "Retention journal in use", labels=["server"]
        )
        jobs = GaugeMetricFamily("siterecovery_jobs", "Jobs by state", labels=["state"])
        alerts = GaugeMetricFamily(
            "siterecovery_alerts_active",
            "Active alerts by object, code (e.g. replication-stalled, frame-refused) and severity",
            labels=["object", "code", "severity"],
        )
        with current().db.session() as s:
            for item in s.scalars(select(ReplicatedItem)):
                if item.rpo_seconds is not None:
                    rpo.add_metric([item.name], item.rpo_seconds)
                health.add_metric([item.name], _HEALTH.get(item.health, 0))
            for c in s.scalars(select(Component)):
                st = c.stats or {}
                if c.kind == ComponentKind.PROCESS:
                    cache.add_metric([c.name], number(st, "cache_used_bytes"))
                    capacity.add_metric([c.name], number(st, "cache_capacity_bytes"))
                    throughput.add_metric([c.name], number(st, "throughput_bytes_per_s"))
                elif c.kind == ComponentKind.MASTER_TARGET:
                    disks.add_metric([c.name], number(st, "attached_disks"))
                    in_use = sum(number(p, "journal_bytes") for p in entries(st, "pairs"))
                    journal.add_metric([c.name], in_use)
            for state, count in Counter(s.scalars(select(Job.state))).items():
                jobs.add_metric([state], count)
            names = {r.id: r.name for r in s.execute(select(ReplicatedItem.id, ReplicatedItem.name))}
            active = s.execute(
                select(Event.object_id, Event.code, Event.severity).where(
                    Event.alert.is_(True), Event.active.is_(True)
                )
            )
            for (obj, code, severity), count in Counter((r[0], r[1], r[2]) for r in active).items():
                alerts.add_metric([names.get(obj, obj), code, severity], count)
        yield from (rpo, health, cache, capacity, throughput, disks, journal, jobs, alerts)


_REGISTRY = CollectorRegistry()
_REGISTRY.register(StateCollector())


@router.get("/metrics", response_class=Response)
def metrics() -> Response:
    return Response(generate_latest(_REGISTRY), media_type=CONTENT_TYPE_LATEST)
