"""The agent's bookmarks: app-consistent points on request and crash points on a timer.

A bookmark is one marker inserted into every pair of the agent at the same instant with respect to
captured writes (`Agent.insert_bookmark` holds every export's capture lock meanwhile), so the points
of one tag across a machine's disks form a consistent cut. A requested bookmark with `freeze` runs
the freeze hook first (the guest flushes and pauses its writes) and the thaw hook after, whatever
happened in between. Each requested tag is done once: done and failed tags are kept in
`<state_dir>/bookmarks.json`. Crash bookmarks (`crash-<epoch ms>`) go in every
`crash_interval_seconds` when something was written since the previous one. Bookmarks wait while
any pair is syncing or tracking dirty blocks: a point inside a sync would not be consistent.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from siterecovery.dataplane.assignments import BookmarkRequest
from siterecovery.dataplane.protocol import BookmarkKind

log = logging.getLogger(__name__)

HOOK_TIMEOUT = 60.0
REPORTED_DONE = 50  # tags reported in the agent's statistics
KEPT_TAGS = 1000  # tags remembered so a request still in the desired state is not repeated
_TICK = 0.1
_KINDS = {"app": BookmarkKind.APP, "group": BookmarkKind.GROUP, "crash": BookmarkKind.CRASH}


class NotReady(Exception):
    """A pair is not protected yet (syncing, or tracking dirty blocks); try the bookmark later."""


@dataclass(frozen=True)
class Hooks:
    """Shell commands run around an app-consistent bookmark, and the machine they run for."""

    machine: str
    freeze: str | None = None
    thaw: str | None = None


# (tag, kind, only_if_written) -> whether a bookmark was inserted; raises NotReady.
Insert = Callable[[str, BookmarkKind, bool], bool]
Ready = Callable[[], bool]


class Bookmarker:
    def __init__(self, state_dir: Path, hooks: Hooks, ready: Ready, insert: Insert) -> None:
        self._path = state_dir / "bookmarks.json"
        self._hooks = hooks
        self._ready = ready
        self._insert = insert
        self._done: list[str] = []
        self._errors: dict[str, str] = {}
        if self._path.exists():
            saved = json.loads(self._path.read_text())
            self._done = [str(t) for t in saved["done"]]
            self._errors = {str(k): str(v) for k, v in saved["errors"].items()}
        self._requests: list[BookmarkRequest] = []
        self._crash_interval = 5.0
        self._last_crash = time.monotonic()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bookmarks", daemon=True)

    def update(self, requests: list[BookmarkRequest], crash_interval: float) -> None:
        with self._lock:
            self._requests = list(requests)
            self._crash_interval = crash_interval
        if self._thread.ident is None and not self._stop.is_set():  # start once, never restart
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=HOOK_TIMEOUT * 2 + 5)

    @property
    def done(self) -> list[str]:
        with self._lock:
            return self._done[-REPORTED_DONE:]

    @property
    def errors(self) -> dict[str, str]:
        with self._lock:
            return dict(self._errors)

    def _run(self) -> None:
        # The bookmark thread must outlive one failed pass (a disk error, a hook gone wrong): when it
        # died, the agent died with it and took the machine's disk offline.
        while not self._stop.wait(_TICK):
            try:
                self._pass()
            except Exception:
                log.exception("bookmark pass failed; retrying")

    def _pass(self) -> None:
        with self._lock:
            handled = set(self._done) | set(self._errors)
            pending = [r for r in self._requests if r.tag not in handled]
            interval = self._crash_interval
        for req in pending:
            if self._stop.is_set():
                return
            self._request(req)
        now = time.monotonic()
        # Fire up to one tick early, so consecutive crash points are never more than `interval` apart.
        if interval > 0 and now - self._last_crash >= interval - _TICK:
            self._last_crash = now
            with contextlib.suppress(NotReady):
                self._insert(f"crash-{int(time.time() * 1000)}", BookmarkKind.CRASH, True)

    def _request(self, req: BookmarkRequest) -> None:
        kind = _KINDS.get(req.kind)
        if kind is None:
            self._record(req.tag, f"invalid-input: bookmark kind {req.kind!r} is not app, group or crash")
            return
        if req.freeze and not self._hooks.freeze:
            self._record(
                req.tag,
                "agent-no-freeze-hook: the agent has no --freeze-hook, so it cannot take an "
                "app-consistent bookmark; ask for one without freeze or configure the hook",
            )
            return
        if not self._ready():
            return  # asked again on the next tick
        error = (
            self._hook("freeze", self._hooks.freeze, req.tag) if req.freeze and self._hooks.freeze else None
        )
        inserted = False
        try:
            if error is None:
                inserted = self._insert(req.tag, kind, False)
        except NotReady:
            pass
        finally:
            if req.freeze and self._hooks.thaw:
                # Thaw even after a failed freeze: the guest may be half frozen.
                thawed = self._hook("thaw", self._hooks.thaw, req.tag)
                if thawed is not None:
                    log.warning("bookmark %s: %s", req.tag, thawed)
        if error is not None:
            log.warning("bookmark %s not taken: %s", req.tag, error)
            self._record(req.tag, error)
        elif inserted:
            log.info("bookmark %s (%s) inserted into every pair", req.tag, req.kind)
            self._record(req.tag, None)

    def _record(self, tag: str, error: str | None) -> None:
        with self._lock:
            if error is None:
                self._done.append(tag)
                self._done = self._done[-KEPT_TAGS:]
            else:
                self._errors[tag] = error
                while len(self._errors) > KEPT_TAGS:
                    self._errors.pop(next(iter(self._errors)))
            saved = {"done": self._done, "errors": self._errors}
        tmp = self._path.with_suffix(".tmp")
        tmp.write_text(json.dumps(saved))
        os.replace(tmp, self._path)

    def _hook(self, which: str, cmd: str, tag: str) -> str | None:
        """Run a hook; None if it succeeded, else why it failed."""
        env = {**os.environ, "SITERECOVERY_MACHINE": self._hooks.machine, "SITERECOVERY_BOOKMARK_TAG": tag}
        try:
            done = subprocess.run(
                cmd, shell=True, env=env, capture_output=True, timeout=HOOK_TIMEOUT, stdin=subprocess.DEVNULL
            )
        except subprocess.TimeoutExpired:
            return f"{which}-hook-timeout: the {which} hook did not finish within {HOOK_TIMEOUT:.0f} s"
        if done.returncode != 0:
            tail = done.stderr.decode(errors="replace").strip()[-300:]
            return f"{which}-hook-failed: the {which} hook exited with code {done.returncode}: {tail}"
        return None
