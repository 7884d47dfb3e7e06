"""The mobility agent: exports each protected disk over NBD and replicates its writes (AG-1).

The agent reconciles toward its desired state (`AgentDesired`): for every disk replication it opens
the pair's spool and state (`PairReplication`, the NBD export's `CaptureSink`), serves the disk as
an NBD export named after its label (one Unix socket `<label>.sock` per disk, and/or a TCP
listener), and runs the pair's sender to the process server in a child process it supervises
(`sender_process.py`). Capture is never off while a protected
disk accepts writes: the pairs are listed durably in `<state_dir>/pairs.json` before they capture,
and at start (`Agent.start`) they are resumed and plugged into their disks' capture switches
before any export serves, whether or not the agent has registered or can reach the configuration
server; senders start as soon as a certificate is there. A disk with no pair plugged in tracks its
writes in a dirty bitmap, resynced when its pair comes back. On a graceful stop it first drains the
spools to the process server for up to a configurable time. Bookmarks (requested app-consistent
ones around the freeze/thaw hooks, and periodic crash ones) go into all pairs at once
(`bookmarks.py`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from siterecovery.dataplane.activity_log import ActivityLog
from siterecovery.dataplane.assignments import AgentDesired, AgentStats, DiskExport, DiskReplication
from siterecovery.dataplane.bookmarks import Bookmarker, Hooks, NotReady
from siterecovery.dataplane.dirty import DirtyBitmap
from siterecovery.dataplane.fileio import write_durably
from siterecovery.dataplane.links import Identity
from siterecovery.dataplane.nbd.image import Export
from siterecovery.dataplane.nbd.server import run_nbd_server_in_thread
from siterecovery.dataplane.protocol import BookmarkKind
from siterecovery.dataplane.replica import DEFAULT_SPOOL_LIMIT, PairReplication
from siterecovery.dataplane.sender_process import SenderProcess, SpareChild
from siterecovery.dataplane.trust import Revocations
from siterecovery.errors import Problem, SiteRecoveryError

log = logging.getLogger(__name__)

# The pairs the agent replicates, as last told: read at start, before any disk is served.
PAIRS_FILE = "pairs.json"
# Tests only: the agent exits (code FAULT_EXIT_CODE) at the N+1th write, after the image, before capture.
FAULT_EXIT_BEFORE_CAPTURE = "SITERECOVERY_FAULT_EXIT_BEFORE_CAPTURE"
FAULT_EXIT_CODE = 86


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
    activity_log: bool = True  # the write-intent log (off only to measure what it costs)
    spare_sender: bool = False  # start a sender child ahead for the first pair (`SpareChild`)


class _SinkSwitch:
    """The capture sink an export keeps for its whole life; replication plugs in and out of it.

    Swapping the NBD server to start or stop capturing would drop the guest's connection, so the
    export always writes through this switch and only its target changes. While no pair is
    plugged in (not known yet, or retired), writes are tracked in the disk's own persisted dirty
    bitmap; a pair plugged in later resyncs them, unless it starts with a sync of the whole disk.
    """

    def __init__(self, untracked: DirtyBitmap) -> None:
        self._lock = threading.Lock()
        self._target: PairReplication | None = None
        self._untracked = untracked
        # Fault injection for tests: exit after this many writes, between image and capture.
        fault = os.environ.get(FAULT_EXIT_BEFORE_CAPTURE)
        self._exit_after = int(fault) if fault else -1

    def track(self, ranges: list[tuple[int, int]]) -> None:
        """Track these ranges as written while no pair captured them (saved at once)."""
        with self._lock:
            for offset, length in ranges:
                self._untracked.mark(offset, min(length, self._untracked.size - offset))
            self._untracked.save()

    def _fault(self) -> None:
        if self._exit_after >= 0:
            if self._exit_after == 0:
                os._exit(FAULT_EXIT_CODE)
            self._exit_after -= 1

    @property
    def lock(self) -> threading.Lock:
        """Held, no write is being captured through this export (bookmarks hold every export's)."""
        return self._lock

    def plug(self, target: PairReplication | None) -> None:
        with self._lock:
            if self._target is not None:
                self._target.settle()  # its held-back writes stay ahead of the switch
            if target is not None and self._untracked.any():
                if not target.fresh:
                    target.absorb(self._untracked)
                self._untracked.clear()
                self._untracked.save()
            self._target = target

    @property
    def target(self) -> PairReplication | None:
        return self._target

    def record_write(self, offset: int, data: memoryview) -> int:
        self._fault()
        with self._lock:
            if self._target is not None:
                return self._target.record_write(offset, data)
            self._untracked.mark(offset, len(data))
            return 0

    def record_writes(self, writes: Sequence[tuple[int, memoryview]]) -> None:
        if self._exit_after >= 0:
            for _ in writes:
                self._fault()
        with self._lock:
            if self._target is not None:
                self._target.record_writes(writes)
                return
            for offset, data in writes:
                self._untracked.mark(offset, len(data))

    def record_zero(self, offset: int, length: int) -> int:
        with self._lock:
            if self._target is not None:
                return self._target.record_zero(offset, length)
            self._untracked.mark(offset, length)
            return 0

    def settle(self) -> None:
        with self._lock:
            if self._target is not None:
                self._target.settle()

    def export_load(self, busy: float, now: float) -> None:
        target = self._target  # a hint: no lock (a pair plugged out meanwhile just hears it once more)
        if target is not None:
            target.export_load(busy, now)

    def flush(self) -> None:
        with self._lock:
            if self._target is not None:
                self._target.flush()
            else:
                self._untracked.save()


class Agent:
    """The agent's pairs, exports and senders (see the module docstring for the restart order)."""

    def __init__(self, options: AgentOptions, identity: Identity | None = None) -> None:
        self.options = options
        # None until the agent has a certificate; its pairs capture meanwhile, senders wait.
        self.identity = identity
        self.pairs: dict[str, PairReplication] = {}
        self.senders: dict[str, SenderProcess] = {}
        self.spare = SpareChild() if options.spare_sender else None
        self._servers: dict[str, _Stoppable] = {}
        self._switches: dict[str, _SinkSwitch] = {}
        self._lock = threading.Lock()
        self._crash_marks: dict[str, int] = {}
        self._pairs_file = options.state_dir / PAIRS_FILE
        self.revoked = Revocations()  # process servers whose certificate it must refuse
        hooks = Hooks(options.machine, options.freeze_hook, options.thaw_hook)
        self.bookmarks = Bookmarker(options.state_dir, hooks, self.protected, self.insert_bookmark)

    def start(self) -> None:
        """Resume the pairs of the last run, then serve every disk (capture before any write)."""
        if self.spare is not None:
            self.spare.start()
        with self._lock:
            for spec in self._saved_specs():
                image = spec.image or self.options.disks.get(spec.disk)
                if image is None:
                    log.warning("pair %s: no image for disk %s; not resumed", spec.pair_id, spec.disk)
                    continue
                self._add(spec, image)
            disks = {**self.options.disks, **{p.spec.disk: p.image for p in self.pairs.values()}}
            for label, disk_path in disks.items():
                if label not in self._servers:
                    self._export(label, disk_path)

    def set_identity(self, identity: Identity) -> None:
        """The agent's certificate is known: start the senders of the pairs that wait for it."""
        with self._lock:
            self.identity = identity
            for pair in self.pairs.values():
                self._start_sender(pair)

    def reconcile(self, desired: AgentDesired) -> None:
        """Export every disk and replicate what `desired` lists; stop what it no longer lists (idempotent)."""
        self.bookmarks.update(desired.bookmarks, desired.crash_interval_seconds)
        self.revoked.update(desired.revoked)
        with self._lock:
            for label, disk_path in self.options.disks.items():
                if label not in self._servers:
                    self._export(label, disk_path)
            wanted = {spec.pair_id for spec in desired.replications}
            changed = False
            gone = [p for p in self.pairs if p not in wanted]
            if gone:
                # Unlisted first: a crash in between must not resume a pair that was ended.
                self._save_specs([p.spec for pid, p in self.pairs.items() if pid in wanted])
                for pair_id in gone:
                    self._retire(pair_id)
            for spec in desired.replications:
                pair = self.pairs.get(spec.pair_id)
                if pair is not None:
                    if pair.spec != spec:
                        self._respec(pair, spec)
                        changed = True
                    continue
                image = spec.image or self.options.disks.get(spec.disk)
                if image is None:
                    raise SiteRecoveryError(
                        Problem(
                            code="agent-disk-unknown",
                            message=f"Disk {spec.disk!r} of pair {spec.pair_id!r} has no image on this agent",
                            remediation="Start the agent with --disk LABEL=PATH for it.",
                        )
                    )
                # Listed before it captures: a restart resumes it before serving the disk.
                self._save_specs([*(p.spec for p in self.pairs.values()), spec])
                self._add(spec, image)
                if spec.disk not in self._servers:
                    self._export(spec.disk, image)
            if changed:
                self._save_specs([p.spec for p in self.pairs.values()])

    def _add(self, spec: DiskReplication, image: Path) -> None:
        """Open a pair's spool and state and plug it into its disk's capture switch."""
        pair = PairReplication(spec, image, self.options.state_dir, self.options.spool_limit)
        self.pairs[spec.pair_id] = pair
        self._switch(spec.disk, image).plug(pair)
        self._start_sender(pair)

    def _start_sender(self, pair: PairReplication) -> None:
        if pair.spec.paused or self.identity is None or pair.pair_id in self.senders:
            return
        sender = SenderProcess(pair, self.identity, self.options.name, self.revoked, self.spare)
        self.senders[pair.pair_id] = sender
        sender.start()

    def _respec(self, pair: PairReplication, spec: DiskReplication) -> None:
        """A pair's process server, master target or pause changed: restart its sender.

        A raised generation alone (a resync asked for: the same links) keeps the running sender
        when no sync is pending: stopping the child, starting a new one (interpreter and imports)
        and its TLS links took 0.3-0.4 s before the first block was read, in a delta resync of
        2 GiB whose reading takes 1-2 s (issue 16).
        """
        same_links = spec.model_copy(
            update={"generation": pair.spec.generation, "sync_mode": pair.spec.sync_mode}
        )
        if pair.pair_id in self.senders and same_links == pair.spec and pair.renew_idle(spec):
            return
        sender = self.senders.pop(pair.pair_id, None)
        if sender is not None:
            sender.stop()
        pair.renew(spec)  # a raised generation starts a new initial sync
        self._start_sender(pair)

    def _saved_specs(self) -> list[DiskReplication]:
        try:
            return AgentDesired.model_validate_json(self._pairs_file.read_bytes()).replications
        except FileNotFoundError:
            return []

    def _save_specs(self, specs: list[DiskReplication]) -> None:
        write_durably(self._pairs_file, AgentDesired(replications=specs).model_dump_json().encode())

    def _switch(self, label: str, image: Path) -> _SinkSwitch:
        switch = self._switches.get(label)
        if switch is None:
            disks = self.options.state_dir / "disks"
            disks.mkdir(parents=True, exist_ok=True)
            size = os.stat(image).st_size
            switch = self._switches[label] = _SinkSwitch(DirtyBitmap(disks / f"{label}.dirty", size))
        return switch

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
        switch = self._switch(label, image)
        if unix is None and tcp is None:
            return
        intent = None
        if self.options.activity_log:
            size = os.stat(image).st_size
            intent = ActivityLog(self.options.state_dir / "disks" / f"{label}.al", size)
            if intent.recovered:
                self._recover(label, switch, intent)
        self._servers[label] = run_nbd_server_in_thread(
            [Export.for_image(label, image, switch, intent=intent)], tcp=tcp, unix=unix
        )

    def _recover(self, label: str, switch: _SinkSwitch, intent: ActivityLog) -> None:
        """An unclean stop left extents marked: have them compared with the target and resynced."""
        ranges = intent.recovered_ranges()
        log.warning("disk %s: %d extent(s) of an unclean stop are resynced", label, len(ranges))
        pair = switch.target
        if pair is not None:
            pair.request_resync(ranges)
        else:
            switch.track(ranges)  # no pair to compare with: whoever comes next resyncs them
        intent.forget_recovered()

    def stats(self) -> AgentStats:
        return AgentStats(
            pairs=[p.stats() for p in list(self.pairs.values())],
            bookmarks_done=self.bookmarks.done,
            bookmark_errors=self.bookmarks.errors,
            exports=self.exports(),
        )

    def exports(self) -> list[DiskExport]:
        """The disks it was started with and their sockets, absolute: the configuration server
        points a libvirt domain's disks there (capture), so it knows them from the first report."""
        unix = self.options.nbd_unix_dir
        return [
            DiskExport(
                disk=label,
                image=os.path.abspath(image),
                socket=os.path.abspath(unix / f"{label}.sock") if unix is not None else "",
            )
            for label, image in sorted(self.options.disks.items())
        ]

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
        if self.spare is not None:
            self.spare.close()
        for pair in self.pairs.values():
            pair.flush()
            pair.spool.close()
        for switch in self._switches.values():
            switch.flush()
