"""The mobility agent: exports each protected disk over NBD and replicates its writes (AG-1).

The agent reconciles toward its desired state (`AgentDesired`): for every disk replication it opens
the pair's spool and state (`PairReplication`, the NBD export's `CaptureSink`), serves the disk as
an NBD export named after its label (one Unix socket `<label>.sock` per disk, and/or a TCP
listener), and runs a `PairSender` to the process server. On a graceful stop it first drains the
spools to the process server for up to a configurable time. Bookmarks (requested app-consistent
ones around the freeze/thaw hooks, and periodic crash ones) go into all pairs at once
(`bookmarks.py`).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from siterecovery.dataplane.assignments import AgentDesired, AgentStats
from siterecovery.dataplane.bookmarks import Bookmarker, Hooks, NotReady
from siterecovery.dataplane.links import Identity
from siterecovery.dataplane.nbd import Export, run_nbd_server_in_thread
from siterecovery.dataplane.protocol import BookmarkKind
from siterecovery.dataplane.replica import DEFAULT_SPOOL_LIMIT, PairReplication
from siterecovery.dataplane.sender import PairSender
from siterecovery.dataplane.trust import Revocations
from siterecovery.errors import Problem, SiteRecoveryError

log = logging.getLogger(__name__)


def _protected(pair: PairReplication) -> bool:
    return pair.sync is None and not pair.dirty_mode


class _Stoppable(Protocol):
    def stop(self) -> None: ...


@dataclass
class AgentOptions:
    state_dir: Path
    disks: dict[str, Path] = field(default_factory=dict)
    nbd_unix_dir: Path | None = None
    nbd_listen: tuple[str, int] | None = None
    spool_limit: int = DEFAULT_SPOOL_LIMIT
    name: str = "agent"
    machine: str = ""
    freeze_hook: str | None = None  # shell command run before an app-consistent bookmark
    thaw_hook: str | None = None  # shell command run after it


class _SinkSwitch:
    """The capture sink an export keeps for its whole life; replication plugs in and out of it.

    Swapping the NBD server to start or stop capturing would drop the guest's connection, so the
    export always writes through this switch and only its target changes. Writes made before a
    pair is plugged in are covered by that pair's initial sync, which reads the disk afterwards.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._target: PairReplication | None = None

    @property
    def lock(self) -> threading.Lock:
        """Held, no write is being captured through this export (bookmarks hold every export's)."""
        return self._lock

    def plug(self, target: PairReplication | None) -> None:
        with self._lock:
            self._target = target

    @property
    def target(self) -> PairReplication | None:
        return self._target

    def record_write(self, offset: int, data: memoryview) -> int:
        with self._lock:
            return self._target.record_write(offset, data) if self._target is not None else 0

    def record_zero(self, offset: int, length: int) -> int:
        with self._lock:
            return self._target.record_zero(offset, length) if self._target is not None else 0

    def flush(self) -> None:
        with self._lock:
            if self._target is not None:
                self._target.flush()


class Agent:
    def __init__(self, options: AgentOptions, identity: Identity | None = None) -> None:
        self.options = options
        # None until the agent has registered (AG-1); its disks are served meanwhile.
        self.identity = identity
        self.pairs: dict[str, PairReplication] = {}
        self.senders: dict[str, PairSender] = {}
        self._servers: dict[str, _Stoppable] = {}
        self._switches: dict[str, _SinkSwitch] = {}
        self._lock = threading.Lock()
        self._crash_marks: dict[str, int] = {}
        self.revoked = Revocations()  # process servers whose certificate it must refuse
        hooks = Hooks(options.machine, options.freeze_hook, options.thaw_hook)
        self.bookmarks = Bookmarker(options.state_dir, hooks, self.protected, self.insert_bookmark)

    def reconcile(self, desired: AgentDesired) -> None:
        """Export every disk and replicate what `desired` lists; stop what it no longer lists (idempotent)."""
        self.bookmarks.update(desired.bookmarks, desired.crash_interval_seconds)
        self.revoked.update(desired.revoked)
        with self._lock:
            for label, disk_path in self.options.disks.items():
                if label not in self._servers:
                    self._export(label, disk_path)
            wanted = {spec.pair_id for spec in desired.replications}
            for pair_id in [p for p in self.pairs if p not in wanted]:
                self._retire(pair_id)
            for spec in desired.replications:
                if spec.pair_id in self.pairs:
                    continue
                if self.identity is None:
                    raise SiteRecoveryError(
                        Problem(
                            code="component-not-registered",
                            message=f"The agent cannot replicate pair {spec.pair_id!r} before it registered",
                            remediation="Wait for the agent to register with the configuration server.",
                        )
                    )
                image = spec.image or self.options.disks.get(spec.disk)
                if image is None:
                    raise SiteRecoveryError(
                        Problem(
                            code="agent-disk-unknown",
                            message=f"Disk {spec.disk!r} of pair {spec.pair_id!r} has no image on this agent",
                            remediation="Start the agent with --disk LABEL=PATH for it.",
                        )
                    )
                if spec.disk not in self._servers:
                    self._export(spec.disk, image)
                pair = PairReplication(spec, image, self.options.state_dir, self.options.spool_limit)
                self.pairs[spec.pair_id] = pair
                self._switches[spec.disk].plug(pair)
                if not spec.paused:
                    ctx = self.identity.client_context()
                    sender = PairSender(pair, ctx, self.options.name, self.revoked)
                    self.senders[spec.pair_id] = sender
                    sender.start()

    def protected(self) -> bool:
        """Every pair is past its sync and captures writes in order: a bookmark is a consistent cut."""
        with self._lock:
            return bool(self.pairs) and all(_protected(p) for p in self.pairs.values())

    def insert_bookmark(self, tag: str, kind: BookmarkKind, only_if_written: bool) -> bool:
        """Insert one bookmark into every pair at the same instant with respect to captured writes.

        Every export's capture lock is held meanwhile, so no write is recorded in one pair before
        the marker and in another after it. Raises `NotReady` if a pair is not protected; with
        `only_if_written`, inserts nothing (False) when no pair captured anything since the last one.
        """
        with self._lock:
            pairs = list(self.pairs.values())
            if not pairs:
                return False
            with contextlib.ExitStack() as held:
                for label in sorted(self._switches):
                    held.enter_context(self._switches[label].lock)
                if not all(_protected(p) for p in pairs):
                    raise NotReady(tag)
                marks = self._crash_marks
                if only_if_written and all(p.captured_seq <= marks.get(p.pair_id, -1) for p in pairs):
                    return False
                for p in pairs:
                    marks[p.pair_id] = p.bookmark(tag, kind, sync=False)
            for p in pairs:
                p.spool.sync()
        return True

    def _retire(self, pair_id: str) -> None:
        """Stop replicating a pair the desired state dropped (e.g. after a failover)."""
        pair = self.pairs.pop(pair_id)
        for switch in self._switches.values():
            if switch.target is pair:
                switch.plug(None)
        sender = self.senders.pop(pair_id, None)
        if sender is not None:
            sender.stop()
        pair.flush()
        pair.spool.close()

    def _export(self, label: str, image: Path) -> None:
        unix = None
        if self.options.nbd_unix_dir is not None:
            self.options.nbd_unix_dir.mkdir(parents=True, exist_ok=True)
            unix = self.options.nbd_unix_dir / f"{label}.sock"
            unix.unlink(missing_ok=True)
        tcp = None
        if self.options.nbd_listen is not None:
            host, port = self.options.nbd_listen
            tcp = (host, port + len(self._servers)) if port else (host, 0)
        switch = self._switches.setdefault(label, _SinkSwitch())
        if unix is None and tcp is None:
            return
        self._servers[label] = run_nbd_server_in_thread(
            [Export.for_image(label, image, switch)], tcp=tcp, unix=unix
        )

    def stats(self) -> AgentStats:
        return AgentStats(
            pairs=[p.stats() for p in list(self.pairs.values())],
            bookmarks_done=self.bookmarks.done,
            bookmark_errors=self.bookmarks.errors,
        )

    def drained(self) -> bool:
        return all(p.drained() for p in self.pairs.values())

    def drain(self, timeout: float) -> bool:
        """Wait until every captured write is acknowledged by the process server, or `timeout`."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.drained():
                return True
            time.sleep(0.1)
        return self.drained()

    def stop(self, drain_timeout: float = 0.0) -> None:
        """Stop accepting writes, drain for up to `drain_timeout` seconds, then stop sending."""
        self.bookmarks.stop()
        for server in self._servers.values():
            server.stop()
        self._servers.clear()
        if drain_timeout > 0 and not self.drain(drain_timeout):
            log.warning("agent stopped with writes not yet acknowledged; they stay in the spool")
        for sender in self.senders.values():
            sender.stop()
        for pair in self.pairs.values():
            pair.flush()
            pair.spool.close()
