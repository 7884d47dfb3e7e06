"""Reads a session's frames on a thread of their own, ahead of the thread that applies them.

The master target used to receive, decrypt and verify a frame on the same thread that applies it
and syncs the replica, so while it waited in fdatasync (every group commit, `ACK_MIN_SECONDS`)
nothing was read: the process server's forwarding stalled, and the whole chain with it (issue 16).
`ReadAhead` keeps reading up to `AHEAD_BYTES` of frames while the applier syncs. Each frame's
payload is in a buffer of its own (drained buffers are reused: a fresh mapping per frame costs page
faults), given back with `release` once applied. Nothing changes for durability: frames are only
acknowledged by the applier, after its sync.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections import deque

from siterecovery.dataplane.protocol import MAX_PAYLOAD, Frame, FrameReader

AHEAD_BYTES = 64 << 20  # frames read but not yet taken by the applier, at most (about)
_POOL_MIN = 64 << 10  # payload buffers at least this large are reused
_POOL_BYTES = 96 << 20


class _Pool:
    """Payload buffers by length, reused once released (thread-safe)."""

    def __init__(self) -> None:
        self._free: dict[int, list[bytearray]] = {}
        self._bytes = 0
        self._lock = threading.Lock()

    def take(self, n: int) -> memoryview:
        if n >= _POOL_MIN:
            with self._lock:
                free = self._free.get(n)
                if free:
                    self._bytes -= n
                    return memoryview(free.pop())
        return memoryview(bytearray(n))

    def give(self, buf: bytearray) -> None:
        n = len(buf)
        if n < _POOL_MIN:
            return
        with self._lock:
            if self._bytes + n <= _POOL_BYTES:
                self._free.setdefault(n, []).append(buf)
                self._bytes += n


class ReadAhead:
    """Frames of one session, read ahead on their own thread (see the module's paragraph)."""

    def __init__(self, sock: socket.socket, name: str, max_payload: int = MAX_PAYLOAD) -> None:
        self._sock = sock
        self._reader = FrameReader(sock, max_payload)
        self._pool = _Pool()
        self._items: deque[Frame | BaseException | None] = deque()
        self._queued = 0  # payload bytes read and not yet taken
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=f"read-{name}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        item: Frame | BaseException | None
        while True:
            try:
                item = self._reader.read(self._pool.take)
            except BaseException as exc:  # the applier raises it (a corrupt frame: a NACK)
                item = exc
            with self._cond:
                while self._queued >= AHEAD_BYTES and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                self._items.append(item)
                if isinstance(item, Frame):
                    self._queued += len(item.wire)
                self._cond.notify_all()
            if not isinstance(item, Frame):
                return  # the end of the stream, or an error: nothing more to read

    def ready(self, timeout: float) -> bool:
        """Whether a frame (or the end) is there to take within `timeout` seconds (0: now)."""
        with self._cond:
            if not self._items and timeout > 0:
                self._cond.wait_for(lambda: bool(self._items), timeout)
            return bool(self._items)

    def next(self) -> Frame | None:
        """The next verified frame, None at a clean end of the stream; raises what reading raised."""
        with self._cond:
            self._cond.wait_for(lambda: bool(self._items))
            item = self._items.popleft()
            if isinstance(item, Frame):
                self._queued -= len(item.wire)
                self._cond.notify_all()
        if isinstance(item, BaseException):
            raise item
        return item

    def release(self, frame: Frame) -> None:
        """`frame` is applied: its payload buffer may be reused."""
        owner = frame.wire.obj
        if isinstance(owner, bytearray):
            self._pool.give(owner)

    def close(self) -> None:
        """Stop reading (the session ends); the socket stays open for a last frame to be sent."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread.is_alive():
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_RD)  # wakes the reader blocked in recv
        self._thread.join(timeout=5)
