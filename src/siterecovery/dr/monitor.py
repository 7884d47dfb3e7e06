"""RPO and protection health, evaluated continuously in the configuration server (POL-2, RPW-5).

RPO of an item is the age of the newest write that is durable on the recovery side: when the
master target has applied everything the agent captured (as of the agent's last report), the
item is as fresh as that report; otherwise it is as old as the newest agent report whose captured
writes the master target has all applied (`CaptureHistory`). Above the policy's RPO threshold
the item turns warning (critical above twice it) and an alert opens; both clear when RPO recovers.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, cast

import pydantic_core
from sqlalchemy import String, Text, bindparam, select, type_coerce, update
from sqlalchemy import cast as sql_cast
from sqlalchemy.orm import Session

from siterecovery.dr.bookmarks import schedule_bookmarks
from siterecovery.dr.desired import agent_name
from siterecovery.dr.fabric_access import discover
from siterecovery.dr.guest import powered_on
from siterecovery.dr.heal import UNUSABLE as UNUSABLE_ALERT
from siterecovery.dr.heal import alert_refused_frames, alert_unusable_points
from siterecovery.dr.monitor_state import (
    CaptureHistory,
    Memory,
    PassCount,
    PassInputs,
    collector_paused,
    next_due,
)
from siterecovery.dr.monitor_state import Watched as _Watched
from siterecovery.dr.stall import ALERT as STALL_ALERT
from siterecovery.dr.stall import WATCH, Thresholds, alert_stalls, indexed_stalls, worse
from siterecovery.errors import SiteRecoveryError
from siterecovery.store.cluster import Cluster
from siterecovery.store.context import ControlPlane
from siterecovery.store.events import clear_alert, raise_alert
from siterecovery.store.models import Component, Event, Policy, ReplicatedItem
from siterecovery.store.models import Fabric as FabricRow
from siterecovery.store.points import unusable_by_pair
from siterecovery.store.record import ItemRecord, Replication
from siterecovery.store.states import ComponentKind, Direction, Health, ProtectionState, Severity

log = logging.getLogger("siterecovery.monitor")
INTERVAL = 1.0
DISCOVERY_EVERY = 10  # passes between rediscoveries of the fabrics
RPO_ALERT = "rpo-threshold-exceeded"
RECOVER_EVERY = 3  # passes between looks for jobs of dead server processes (leader only)


@dataclass(frozen=True)
class Rpo:
    item: str
    seconds: float
    caught_up: bool
    since: float = math.inf  # the RPO is `now - since` until an input changes (inf: no pairs)


_HISTORY = CaptureHistory()
WRITE_BATCH = 500  # items written per transaction: a pass never holds the write lock for long


def _pairs(stats: dict[str, Any] | None) -> list[dict[str, Any]]:
    # Raw dicts on purpose: a master target's report carries every retained recovery point, which
    # full validation would parse; each component's report is read once per pass, not per item.
    # (A process server's report counts its pairs: `pairs` is a number there, not a list.)
    pairs = (stats or {}).get("pairs")
    return [p for p in pairs if isinstance(p, dict)] if isinstance(pairs, list) else []


@dataclass(frozen=True)
class _Route:
    """An item's replication as the monitor needs it, parsed once per revision of its details."""

    agent: str
    master_target: str
    pairs: tuple[str, ...]
    process_server: str
    disks: tuple[tuple[str, str], ...]
    held: bool


# Per database, item id -> (details_rev, its route or None when not replicating): a pass reloads
# and parses the details only of items that changed since it last looked (`details_rev`).
_ROUTES: dict[str, dict[str, tuple[int, _Route | None]]] = {}
_ROUTES_LOCK = threading.Lock()
DETAILS_CHUNK = 500
# Items (and agents' reports) seen for the first time that one pass takes on. The first pass
# after a start met every item's record and every agent's report at once — at 5,000 items
# about three times a later pass, the longest pass of a run; spread over a few passes instead,
# an item is evaluated from the pass that reached it (within 5 passes at 5,000 items). What
# changed since a previous pass is always read again: no pass uses a stale record or report.
COLD_PER_PASS = 1000


_REPLICATION = ReplicatedItem.details["replication"]
# An item's health as its stored text: compared with a `Health` (a str enum) as it is, without
# building an enum for each of 5,000 rows a pass.
_HEALTH_TEXT = type_coerce(ReplicatedItem.health, String).label("health")


def _routes(s: Session, revs: dict[str, int]) -> dict[str, _Route | None]:
    with _ROUTES_LOCK:
        url = str(s.get_bind().engine.url)
        cache = _ROUTES.get(url, {})
        # One look per item (5,000 a pass): its route when its details did not change.
        known: dict[str, tuple[int, _Route | None]] = {}
        stale: list[str] = []
        cold: list[str] = []
        for i, rev in revs.items():
            held = cache.get(i)
            if held is None:
                cold.append(i)
            elif held[0] == rev:
                known[i] = held
            else:
                stale.append(i)
        # A changed item is always parsed again; items never seen (every item, on the first pass
        # after a start) at most COLD_PER_PASS a pass — the others wait for the next passes.
        stale += cold[:COLD_PER_PASS]
        for start in range(0, len(stale), DETAILS_CHUNK):
            ids = stale[start : start + DETAILS_CHUNK]
            # Only the record's replication, extracted by the database: decoding every item's whole
            # record was most of the first pass after a start (5,000 records).
            for item_id, raw in cast(
                Iterable[tuple[str, dict[str, Any] | None]],
                s.execute(select(ReplicatedItem.id, _REPLICATION).where(ReplicatedItem.id.in_(ids))),
            ):
                route = None
                if raw is not None:
                    rep = Replication.model_validate(raw)
                    route = _Route(
                        agent_name(rep.source_site.value, rep.source_machine),
                        rep.master_target,
                        tuple(p.pair_id for p in rep.pairs),
                        rep.process_server,
                        tuple((p.pair_id, p.disk) for p in rep.pairs),
                        bool(rep.points),
                    )
                known[item_id] = (revs[item_id], route)
        _ROUTES[url] = known  # items gone since the last pass are forgotten
        return {i: r for i, (_, r) in known.items()}


# Per database, item id -> (what its `_Watched` was built from, it): an unchanged item keeps its
# object. 5,000 new ones a pass, each kept until the next, reached the collector's oldest
# generation and set off a full collection every few passes (0.15-0.2 s holding the GIL).
_WATCHED: dict[str, dict[str, tuple[tuple[Any, ...], _Watched]]] = {}

# A component's report as stored (text, not decoded by the driver): the key of `_STATS`.
_STATS_TEXT = sql_cast(Component.stats, Text)
# Per database and kind, component id -> (its report as stored, decoded, its pairs): a pass
# decodes only the reports that changed since it last looked. At 5,000 agents decoding every
# report on every pass was most of a pass; keyed by the stored text itself, no writer (the
# heartbeat, a liveness batch, a test) has to remember to mark a change.
# The report, its pairs by pair id, and per pair the one number the RPO needs (an agent's captured
# sequence; a master target's applied sequence and its time): derived once per change of the
# report, not per pass (5,000 agents' small dicts rebuilt every pass were a tenth of a pass).
_Decoded = tuple[dict[str, Any], dict[str, dict[str, Any]], dict[str, Any]]
_STATS: dict[tuple[str, str], dict[str, tuple[str | None, _Decoded]]] = {}
_STATS_LOCK = threading.Lock()


def decode_report(text: str) -> Any:
    """A stored report's JSON text as Python values (pydantic's parser: a third faster than `json`)."""
    return pydantic_core.from_json(text)


def _decoded(
    s: Session, kind: str, reports: list[tuple[str, str | None]], cold: int | None = None
) -> dict[str, _Decoded]:
    """(component id, report as stored) -> its report and pairs decoded, decoding only changes;
    of the reports never seen before, at most `cold` (the others are left out of this pass)."""
    with _STATS_LOCK:
        cache = _STATS.setdefault((str(s.get_bind().engine.url), kind), {})
        seen: dict[str, tuple[str | None, _Decoded]] = {}
        for comp_id, text in reports:
            known = cache.get(comp_id)
            if known is None and cold is not None:
                if cold <= 0:
                    continue
                cold -= 1
            if known is None or known[0] != text:
                stats = decode_report(text) if text else {}
                stats = stats if isinstance(stats, dict) else {}
                pairs = {str(p.get("pair_id")): p for p in _pairs(stats)}
                known = (text, (stats, pairs, _derived(kind, pairs)))
            seen[comp_id] = known
        cache.clear()  # components removed since the last pass are forgotten
        cache.update(seen)
    return {comp_id: decoded for comp_id, (_, decoded) in seen.items()}


def _derived(kind: str, pairs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    if kind == "agent":
        return {pid: int(p.get("captured_seq", -1)) for pid, p in pairs.items()}
    return {pid: (int(p.get("applied_seq", -1)), p.get("last_applied_time")) for pid, p in pairs.items()}


def read_inputs(s: Session) -> PassInputs:
    thresholds = {p.id: float(p.rpo_threshold_seconds) for p in s.scalars(select(Policy))}
    # Through the connection, not the ORM: these reads return 5,000 rows each, and the ORM's
    # loading machinery per row was the largest part of reading them.
    conn = s.connection()
    rows = conn.execute(
        select(
            ReplicatedItem.id,
            ReplicatedItem.name,
            ReplicatedItem.updated_at,
            ReplicatedItem.policy_id,
            _HEALTH_TEXT,
            ReplicatedItem.rpo_seconds,
            ReplicatedItem.details_rev,
        ).where(ReplicatedItem.state == ProtectionState.PROTECTED)
    ).all()
    routes = _routes(s, {row.id: row.details_rev for row in rows})
    url = str(s.get_bind().engine.url)
    with _ROUTES_LOCK:
        before = _WATCHED.get(url, {})
        kept: dict[str, tuple[tuple[Any, ...], _Watched]] = {}
        items = []
        for row in rows:
            route = routes.get(row.id)
            if route is None:
                continue
            threshold = thresholds.get(row.policy_id, 900.0)
            key = (row.name, row.updated_at, threshold, row.health, row.rpo_seconds, route)
            held = before.get(row.id)
            if held is not None and held[0] == key:
                watched = held[1]  # the same object as the last pass: nothing of it changed
            else:
                watched = _Watched(
                    row.id,
                    row.name,
                    row.updated_at,
                    threshold,
                    row.health,
                    row.rpo_seconds,
                    route.agent,
                    route.master_target,
                    route.pairs,
                    route.process_server,
                    route.disks,
                    route.held,
                )
            kept[row.id] = (key, watched)
            items.append(watched)
        _WATCHED[url] = kept
    agents: dict[str, tuple[float | None, dict[str, int]]] = {}
    agent_stats: dict[str, dict[str, Any]] = {}
    agent_pairs: dict[str, dict[str, dict[str, Any]]] = {}
    mt_pairs: dict[str, dict[str, dict[str, Any]]] = {}
    agent_rows = conn.execute(
        select(Component.id, Component.name, Component.last_heartbeat, _STATS_TEXT).where(
            Component.kind == ComponentKind.AGENT
        )
    ).all()
    decoded = _decoded(s, "agent", [(row[0], row[3]) for row in agent_rows], COLD_PER_PASS)
    for comp_id, name, beat, _ in agent_rows:
        if comp_id not in decoded:  # first seen, beyond this pass's share: its items wait
            continue
        stats, pairs, captured = decoded[comp_id]
        agents[name] = (beat, captured)
        agent_stats[name] = stats
        agent_pairs[name] = pairs
    applied: dict[str, dict[str, tuple[int, float | None]]] = {}
    by_id: dict[str, dict[str, Any]] = {}
    server_rows = conn.execute(
        select(Component.id, Component.kind, _STATS_TEXT).where(
            Component.kind.in_([ComponentKind.MASTER_TARGET, ComponentKind.PROCESS])
        )
    ).all()
    decoded = _decoded(s, "server", [(row[0], row[2]) for row in server_rows])
    for comp_id, kind, _ in server_rows:
        stats, pairs, derived = decoded[comp_id]
        by_id[comp_id] = stats
        if kind == ComponentKind.MASTER_TARGET:
            mt_pairs[comp_id] = pairs
            applied[comp_id] = derived
    alerts = {
        object_id: severity
        for object_id, severity in s.execute(
            select(Event.object_id, Event.severity).where(
                Event.object_type == "replicatedItem",
                Event.code == RPO_ALERT,
                Event.alert.is_(True),
                Event.active.is_(True),
            )
        )
    }
    open_alerts = {
        (code, object_id)
        for code, object_id in s.execute(
            select(Event.code, Event.object_id).where(
                Event.object_type == "replicatedItem",
                Event.code.in_([STALL_ALERT, UNUSABLE_ALERT]),
                Event.alert.is_(True),
                Event.active.is_(True),
            )
        )
    }
    return PassInputs(
        items,
        agents,
        applied,
        alerts,
        agent_stats,
        by_id,
        open_alerts,
        unusable_by_pair(s),
        agent_pairs,
        mt_pairs,
    )


def item_rpo(
    item: _Watched, inputs: PassInputs, now: float, history: CaptureHistory = _HISTORY
) -> Rpo | None:
    agent = inputs.agents.get(item.agent)
    applied = inputs.applied.get(item.master_target)
    if agent is None or applied is None or agent[0] is None:
        return None
    last_heartbeat, captured = agent
    assert last_heartbeat is not None
    # RPO = now - since (the oldest pair's "durable as of"): its crossings are known in advance.
    since, caught_up = math.inf, True
    for pair_id in item.pairs:
        captured_seq, a = captured.get(pair_id), applied.get(pair_id)
        if captured_seq is None or a is None:
            return Rpo(item.id, max(0.0, now - item.updated_at), False, item.updated_at)
        applied_seq, last_applied = a
        history.record(pair_id, last_heartbeat, captured_seq)
        if applied_seq >= captured_seq:
            durable = last_heartbeat
        else:
            caught_up = False
            covered = history.covered_at(pair_id, applied_seq)
            fallback = last_applied or item.updated_at
            durable = covered if covered is not None else float(fallback)
        since = min(since, durable)
    return Rpo(item.id, 0.0 if math.isinf(since) else max(0.0, now - since), caught_up, since)


def _health(rpo: float, threshold: float) -> Health:
    if rpo > 2 * threshold:
        return Health.CRITICAL
    return Health.WARNING if rpo > threshold else Health.NORMAL


def rpo_step(threshold: float) -> float:
    """How far an item's computed RPO may move before the stored one is rewritten.

    A caught-up item's RPO is the age of its agent's last report: it climbs by a second every
    second until the next heartbeat resets it (a 0-10 s saw-tooth for an idle agent). Storing it
    to the second rewrote every item's row on every pass — 5,000 updates a second at 5,000 items,
    most of a pass and of PostgreSQL's work — to show a number that is stale again a second later.
    The stored RPO is kept within 2 % of the item's threshold instead (18 s at the default 15
    minutes, never finer than a second); health and alerts still follow the exact RPO of every
    pass, and a change of health rewrites the RPO with it, so the value stored when an item turns
    warning or critical is exact.
    """
    return max(1.0, threshold / 50)


def _write(
    cp: ControlPlane,
    inputs: PassInputs,
    results: list[tuple[_Watched, Rpo, Health]],
    now: float,
    thresholds: Thresholds,
) -> None:
    """Store RPO and health, raise and clear alerts: in batches, each its own short transaction.

    An item's health is the worst of its RPO's and of the data-plane checks (a stalled pair,
    refused frames healing, unusable points: `dr.stall`, `dr.heal`); the RPO alert follows RPO.
    """
    for start in range(0, len(results), WRITE_BATCH):
        batch = results[start : start + WRITE_BATCH]
        with cp.db.session() as s:
            # Compared with what the pass read (`_Watched`), not read again: re-reading the two
            # columns of 500 items per batch was a sixth of an idle pass at 5,000 items. The
            # monitor runs in one process (the leader), so they change only when it writes them.
            changed: list[dict[str, Any]] = []
            for item, rpo, rpo_health in batch:
                health = worse(rpo_health, _data_plane_health(s, item, inputs, now, thresholds))
                old_rpo = item.rpo_seconds
                if (
                    old_rpo is None
                    or abs(old_rpo - rpo.seconds) >= rpo_step(item.threshold)
                    or item.health != health
                ):
                    changed.append({"item": item.id, "rpo": round(rpo.seconds, 2), "health": health})
                    # What the row holds once written: the next pass compares its read with it.
                    item.rpo_seconds, item.health = round(rpo.seconds, 2), health.value
                alert = inputs.alerts.get(item.id)
                if rpo_health is Health.NORMAL:
                    if alert is not None:
                        clear_alert(s, RPO_ALERT, "replicatedItem", item.id)
                    continue
                severity = Severity.CRITICAL if rpo_health is Health.CRITICAL else Severity.WARNING
                if alert != severity:
                    raise_alert(
                        s,
                        severity,
                        RPO_ALERT,
                        f"Item {item.name}: RPO {rpo.seconds:.0f} s exceeds the policy's threshold "
                        f"of {item.threshold:.0f} s.",
                        "replicatedItem",
                        item.id,
                    )
            if changed:  # one statement (health and RPO are no desired state's input)
                s.connection().execute(_STORE_RPO, changed)


# An item a workflow took out of protection since the pass's read is left alone.
_STORE_RPO = (
    update(ReplicatedItem)
    .where(ReplicatedItem.id == bindparam("item"), ReplicatedItem.state == ProtectionState.PROTECTED)
    .values(rpo_seconds=bindparam("rpo"), health=bindparam("health"))
)


def _data_plane_health(
    s: Session, item: _Watched, inputs: PassInputs, now: float, thresholds: Thresholds
) -> Health:
    """A pair applying nothing, damaged frames healing, unusable points: from the pass's read."""
    captured_by, applied_by = (
        inputs.agent_pairs.get(item.agent, {}),
        inputs.mt_pairs.get(item.master_target, {}),
    )
    watched = () if item.held else item.pairs
    stalls = indexed_stalls(watched, captured_by, applied_by, now, thresholds=thresholds)
    health = alert_stalls(s, item.id, item.name, stalls, (STALL_ALERT, item.id) in inputs.open_alerts)
    disks = dict(item.disks)
    ps = inputs.stats.get(item.process_server, {})
    health = worse(health, alert_refused_frames(s, item.id, item.name, disks, ps))
    unusable_open = (UNUSABLE_ALERT, item.id) in inputs.open_alerts
    unusable = {pid: inputs.unusable.get((item.master_target, pid), []) for pid in item.pairs}
    return worse(health, alert_unusable_points(s, item.id, item.name, disks, unusable, unusable_open))


# Per database: what the monitor remembers between passes (`dr.monitor_state`).
_MEMORY: dict[str, Memory] = {}
_MEMORY_LOCK = threading.Lock()


def _memory(cp: ControlPlane) -> Memory:
    with _MEMORY_LOCK:
        return _MEMORY.setdefault(str(cp.db.engine.url), Memory())


def run_pass(cp: ControlPlane, now: float | None = None) -> PassCount:
    """One pass: RPO, health and alerts of the items whose inputs changed or whose computed
    crossing came (`dr.monitor_state`); then watches and bookmarks. Returns what it evaluated.

    Reads everything in one read transaction, computes outside any, and writes in short batches,
    so heartbeats and jobs are never queued behind a whole pass (SQLite has one write lock).
    """
    now = now or time.time()
    with collector_paused():
        return _pass(cp, now, _memory(cp))


def _pass(cp: ControlPlane, now: float, memory: Memory) -> PassCount:
    with cp.db.session() as s:
        inputs = read_inputs(s)
    thresholds = Thresholds.from_env()
    chosen, count = memory.to_evaluate(inputs, now, thresholds)
    memory.inputs = None  # a pass that fails half-way is followed by a full one
    results = []
    for item in chosen:
        rpo = item_rpo(item, inputs, now)
        if rpo is None:  # its agent or master target has not reported (or is gone)
            memory.forget(item.id)
            continue
        results.append((item, rpo, _health(rpo.seconds, item.threshold)))
    _write(cp, inputs, results, now, thresholds)
    for item, rpo, _ in results:
        memory.rpo[item.id] = (rpo.since, rpo.caught_up)
        stalled = () if item.held else [t for t in map(WATCH.since, item.pairs) if t is not None]
        step = rpo_step(item.threshold)
        memory.schedule(
            item.id, next_due(now, rpo.since, item.threshold, item.rpo_seconds, step, stalled, thresholds)
        )
    memory.remember(inputs, thresholds)
    with cp.db.session() as s:
        _watch_powered_on_targets(cp, s)
    with cp.db.session() as s:
        schedule_bookmarks(s, now)
    return count


def evaluate(cp: ControlPlane, now: float | None = None) -> list[Rpo]:
    """`run_pass`, then the RPO of every item the monitor follows (evaluated in this pass or not)."""
    now = now or time.time()
    run_pass(cp, now)
    return [
        Rpo(item_id, 0.0 if math.isinf(since) else max(0.0, now - since), caught_up, since)
        for item_id, (since, caught_up) in _memory(cp).rpo.items()
    ]


def _watch_powered_on_targets(cp: ControlPlane, s: Session) -> None:
    """RPW-5: an on-premises machine written by a master target must stay off; alert if it runs."""
    for item in s.scalars(
        select(ReplicatedItem).where(
            ReplicatedItem.direction == Direction.FAILBACK,
            ReplicatedItem.state == ProtectionState.PROTECTED,
        )
    ):
        rec = ItemRecord.model_validate(item.details)
        if powered_on(cp, rec.onprem_fabric, rec.machine):
            raise_alert(
                s,
                Severity.CRITICAL,
                "protected-machine-powered-on",
                f"On-premises machine {rec.machine} was powered on while the master target writes its disks.",
                "replicatedItem",
                item.id,
            )
        else:
            clear_alert(s, "protected-machine-powered-on", "replicatedItem", item.id)


class Monitor:
    """The background thread of the configuration server that runs `evaluate` every second.

    With several server processes only the cluster's leader does the periodic work (see
    `store.cluster`): the others keep asking whether they lead, and take over when it dies.
    """

    def __init__(self, cp: ControlPlane, interval: float = INTERVAL, cluster: Cluster | None = None) -> None:
        self.cp = cp
        self.interval = interval
        self.cluster = cluster
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rpo-monitor", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        passes = 0
        wait = self.interval
        # A pass that takes long (thousands of items on a busy machine) is followed by a rest of
        # twice its length: the monitor never takes more than a third of a core from heartbeats.
        while not self._stop.wait(wait):
            cluster = self.cluster
            if cluster is not None and not cluster.is_leader():
                continue
            started = time.monotonic()
            try:
                if cluster is not None and passes % RECOVER_EVERY == 0:
                    cluster.recover_dead_executors()
                if passes % DISCOVERY_EVERY == 0:
                    refresh_fabrics(self.cp)
                run_pass(self.cp)
            except Exception:  # the monitor must outlive a bad pass (e.g. a fabric that is down)
                log.exception("monitor pass failed")
            passes += 1
            took = time.monotonic() - started
            wait = max(self.interval, 2 * took)
            if cluster is not None:
                cluster.passed(took)


def refresh_fabrics(cp: ControlPlane) -> None:
    """Rediscover every fabric, so power-state watches and the portal see recent inventory."""
    with cp.db.session() as s:
        for row in s.scalars(select(FabricRow)):
            try:
                discover(cp, row)
            except SiteRecoveryError:
                continue  # recorded on the row as its discovery error
