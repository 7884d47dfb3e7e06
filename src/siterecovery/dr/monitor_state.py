"""What the RPO monitor remembers between passes, so a pass evaluates only the items it must.

A pass reads its inputs (`dr.monitor.read_inputs`: items, every component's report, open alerts,
unusable points) and used to evaluate every protected item from them — at 5,000 items about half
of a pass, holding the leader's GIL beside its event loop. An item's RPO, health and alerts depend
only on those inputs and on the clock, and on the clock in a known way: with unchanged inputs its
RPO is `now - since` (since: the oldest "durable as of" time of its pairs), and a stalled pair's
stall is `now - since` of its backlog. So a pass evaluates an item only when

- one of its inputs changed since the previous pass (its row or record, its policy's threshold, its
  agent's report or heartbeat, its pairs in its master target's report, its process server's refused
  frames, its unusable points, its open alerts, the stall thresholds), or
- a time it computed at its last evaluation has come: its RPO crossing the threshold or twice it, its
  stored RPO falling `rpo_step` behind, a stalled pair reaching the warning or critical threshold
  (`Memory.schedule`, a heap of those times).

Every such crossing is seen at the first pass at or after it, as when every item was evaluated on
every pass: health and alerts are unchanged, only the work is O(changed + due). Every
`FULL_EVERY` passes, and after a pass that failed, every item is evaluated anyway (a safety net,
not a correctness need). Also here: the capture history the RPO is computed from, and the pause
of cyclic garbage collection a pass runs under.
"""

from __future__ import annotations

import gc
import heapq
import math
from collections import deque
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from siterecovery.dr.stall import Thresholds
from siterecovery.store.states import Severity

FULL_EVERY = 300  # passes between evaluations of every item (a safety net)
EARLY = 1e-3  # a due time is this much before its crossing: evaluating early changes nothing


class CaptureHistory:
    """Per pair, when the agent reported which sequence number it had captured (newest last).

    RPO is the age of the newest write durable on the recovery side. The master target reports the
    sequence it applied, not when that write was captured; this history turns "applied up to n" into
    "everything captured up to the report at time t", so lag shows even while applying goes on.
    """

    def __init__(self, keep_seconds: float = 3600.0) -> None:
        self.keep_seconds = keep_seconds
        self._pairs: dict[str, deque[tuple[float, int]]] = {}

    def record(self, pair_id: str, reported_at: float, captured_seq: int) -> None:
        entries = self._pairs.setdefault(pair_id, deque())
        if not entries or reported_at > entries[-1][0]:
            entries.append((reported_at, captured_seq))
        while entries and entries[0][0] < reported_at - self.keep_seconds:
            entries.popleft()

    def covered_at(self, pair_id: str, applied_seq: int) -> float | None:
        """The time of the newest report whose captured writes are all applied."""
        return next((t for t, seq in reversed(self._pairs.get(pair_id, ())) if seq <= applied_seq), None)


@contextmanager
def collector_paused() -> Iterator[None]:
    """No cyclic garbage collection during a pass. A pass's rows (5,000 items, 5,000 agents' reports)
    live across many young collections, so they were promoted to the oldest generation and set
    off a full collection every two or three passes at 5,000 items: 0.13-0.2 s holding the GIL
    (the event loop's requests waiting), as long as the pass itself. They hold no cycles, so
    reference counting frees them at the pass's end; other threads' cycles wait a pass at most."""
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


@dataclass(slots=True)  # not frozen: 5,000 built a pass, and a frozen dataclass's init is slower
class Watched:
    """What a pass needs of a protected item, read once (its replication, not its whole record)."""

    id: str
    name: str
    updated_at: float
    threshold: float
    health: str
    rpo_seconds: float | None
    agent: str  # agent name
    master_target: str
    pairs: tuple[str, ...]
    process_server: str = ""
    disks: tuple[tuple[str, str], ...] = ()  # pair -> disk label
    held: bool = False  # held at a chosen point for a failover: nothing is applied, no stall


@dataclass
class PassInputs:
    """Everything one pass reads, in one short read transaction; each component's stats decoded once."""

    items: list[Watched]
    agents: dict[str, tuple[float | None, dict[str, int]]]  # name -> last heartbeat, captured seq by pair
    applied: dict[str, dict[str, tuple[int, float | None]]]  # mt id -> pair -> applied seq, its time
    alerts: dict[str, Severity]  # item id -> severity of its active RPO alert
    # The data-plane checks' inputs (`dr.stall`, `dr.heal`), read in the same transaction: each
    # component's report decoded once per pass, not once per item (a master target's lists every
    # point of every pair), and which items have a stall or unusable-points alert open to clear.
    agent_stats: dict[str, dict[str, Any]] = field(default_factory=dict)  # by agent name
    stats: dict[str, dict[str, Any]] = field(default_factory=dict)  # master targets, process servers
    open_alerts: set[tuple[str, str]] = field(default_factory=set)  # (code, item id)
    # Why points cannot be restored, by (master target, pair): the unusable rows only.
    unusable: dict[tuple[str, str], list[str]] = field(default_factory=dict)
    # The agents' and master targets' report pairs by pair id (the stall check's input).
    agent_pairs: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)  # by agent name
    mt_pairs: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)  # by master target


def _index(items: Iterable[Watched]) -> tuple[dict[str, list[str]], ...]:
    """Item ids by agent name, by pair, by process server and by master target."""
    by_agent: dict[str, list[str]] = {}
    by_pair: dict[str, list[str]] = {}
    by_ps: dict[str, list[str]] = {}
    by_mt: dict[str, list[str]] = {}
    for item in items:
        by_agent.setdefault(item.agent, []).append(item.id)
        by_ps.setdefault(item.process_server, []).append(item.id)
        by_mt.setdefault(item.master_target, []).append(item.id)
        for pid in item.pairs:
            by_pair.setdefault(pid, []).append(item.id)
    return by_agent, by_pair, by_ps, by_mt


def _differs(old: Mapping[Any, Any], new: Mapping[Any, Any]) -> Iterable[Any]:
    """The keys whose values differ between two mappings (present in one only included)."""
    if old is new:
        return ()
    return [k for k in old.keys() | new.keys() if old.get(k) is not new.get(k) and old.get(k) != new.get(k)]


Index = tuple[dict[str, list[str]], ...]


def changed_items(
    prev: PassInputs, new: PassInputs, prev_items: Mapping[str, Watched], index: Index | None = None
) -> tuple[set[str], Index]:
    """The items whose inputs differ between two passes' reads (see the module's list), and the
    new read's index (`index`, the previous one, is reused while no item's own row changed:
    rebuilding it was a third of a pass that evaluated 500 of 5,000 items)."""
    dirty = {item.id for item in new.items if (was := prev_items.get(item.id)) is not item and was != item}
    if index is None or dirty or len(new.items) != len(prev_items):
        index = _index(new.items)
    by_agent, by_pair, by_ps, by_mt = index
    for name in _differs(prev.agents, new.agents):
        dirty.update(by_agent.get(name, ()))
    for name in _differs(prev.agent_pairs, new.agent_pairs):
        dirty.update(by_agent.get(name, ()))
    for mt in prev.mt_pairs.keys() | new.mt_pairs.keys():
        old, pairs = prev.mt_pairs.get(mt), new.mt_pairs.get(mt)
        if old is None or pairs is None:  # a master target met or gone: every item it serves
            dirty.update(by_mt.get(mt, ()))
            continue
        for pid in _differs(old, pairs):  # only the items whose own pairs moved
            dirty.update(by_pair.get(pid, ()))
    for comp in prev.stats.keys() | new.stats.keys():
        old_stats, stats = prev.stats.get(comp), new.stats.get(comp)
        if old_stats is not stats and (old_stats or {}).get("refused_frames") != (stats or {}).get(
            "refused_frames"
        ):
            dirty.update(by_ps.get(comp, ()))
    for _mt, pid in _differs(prev.unusable, new.unusable):
        dirty.update(by_pair.get(pid, ()))
    dirty.update(_differs(prev.alerts, new.alerts))
    dirty.update(item_id for _code, item_id in prev.open_alerts ^ new.open_alerts)
    return dirty, index


@dataclass
class PassCount:
    """What one pass evaluated and why: the O(changed) claim is counted on these, not timed."""

    items: int = 0  # protected items the pass read
    changed: int = 0  # evaluated because an input changed
    due: int = 0  # evaluated because a time they computed came
    evaluated: int = 0  # both (and every item on a full pass)
    full: bool = False


class Memory:
    """One database's monitor memory: the previous pass's read, each item's RPO origin, due times."""

    def __init__(self) -> None:
        self.inputs: PassInputs | None = None  # None: the next pass evaluates every item
        self.items: dict[str, Watched] = {}
        self.thresholds: Thresholds | None = None
        self.passes = 0
        # item -> (since when its RPO counts, caught up): its RPO at any time without evaluating it
        self.rpo: dict[str, tuple[float, bool]] = {}
        self._due: dict[str, float] = {}
        self._heap: list[tuple[float, str]] = []
        self._index: Index | None = None  # item ids by agent, pair, process server, master target

    def to_evaluate(
        self, inputs: PassInputs, now: float, thresholds: Thresholds
    ) -> tuple[list[Watched], PassCount]:
        """The items of this pass's read that it must evaluate (and forget the ones gone)."""
        count = PassCount(items=len(inputs.items))
        prev = self.inputs
        if prev is None or self.thresholds != thresholds or self.passes % FULL_EVERY == 0:
            count.full = True
            count.evaluated = count.changed = len(inputs.items)
            self._due.clear()
            self._heap.clear()
            self._index = None
            return list(inputs.items), count
        changed, self._index = changed_items(prev, inputs, self.items, self._index)
        due = self._pop_due(now) - changed
        count.changed, count.due = len(changed), len(due)
        wanted = changed | due
        chosen = [item for item in inputs.items if item.id in wanted] if wanted else []
        count.evaluated = len(chosen)
        return chosen, count

    def remember(self, inputs: PassInputs, thresholds: Thresholds) -> None:
        """After a pass that wrote everything: its read is what the next pass compares with."""
        self.inputs = inputs
        self.items = {item.id: item for item in inputs.items}
        self.thresholds = thresholds
        self.passes += 1
        for gone in [i for i in self.rpo if i not in self.items]:
            self.forget(gone)

    def forget(self, item_id: str) -> None:
        self.rpo.pop(item_id, None)
        self._due.pop(item_id, None)

    def schedule(self, item_id: str, due: float) -> None:
        """Evaluate the item again at the first pass at or after `due` (inf: only on a change)."""
        if math.isinf(due):
            self._due.pop(item_id, None)
            return
        self._due[item_id] = due
        heapq.heappush(self._heap, (due, item_id))
        if len(self._heap) > 4 * len(self._due) + 1024:  # entries replaced since: drop them
            self._heap = [(d, i) for i, d in self._due.items()]
            heapq.heapify(self._heap)

    def _pop_due(self, now: float) -> set[str]:
        due: set[str] = set()
        heap = self._heap
        while heap and heap[0][0] <= now:
            at, item_id = heapq.heappop(heap)
            if self._due.get(item_id) == at:  # not replaced by a later evaluation
                del self._due[item_id]
                due.add(item_id)
        return due


def next_due(
    now: float,
    since: float,
    threshold: float,
    stored_rpo: float | None,
    step: float,
    stalls_since: Iterable[float],
    stall: Thresholds,
) -> float:
    """The earliest time, after `now`, at which the item's health, alerts or stored RPO may change
    with no new input: its RPO (`now - since`) crossing the threshold or twice it or moving `step`
    from the stored one, a stalled pair reaching a stall threshold. Slightly early (`EARLY`)."""
    crossings: list[float] = []
    if not math.isinf(since):
        crossings += [since + threshold, since + 2 * threshold, since + (stored_rpo or 0.0) + step]
    for began in stalls_since:
        crossings += [began + stall.warning, began + stall.critical]
    future = [c for c in crossings if c > now - EARLY]
    return min(future) - EARLY if future else math.inf
