"""A TCP relay the test controls, put between the process server and the master target.

The master target advertises the relay's address (`--advertise`), so the process server's link
runs through it. `cut()` stops the link the way a WAN outage does: nothing more is delivered
either way, on open connections or new ones, and the peers see silence, not a reset; `restore()`
delivers again (what TCP retransmission does once a link is back). The upstream address is read
when a connection opens, so the master target may restart on another port.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

_CHUNK = 1 << 16


@dataclass
class LinkProxy:
    upstream: Callable[[], str]  # host:port of the far end, asked per connection
    forwarded: int = 0  # bytes delivered, both ways
    _listener: socket.socket | None = None
    _open: threading.Event = field(default_factory=threading.Event)
    _closed: threading.Event = field(default_factory=threading.Event)
    _socks: set[socket.socket] = field(default_factory=set)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    # Chunks past the open check and not yet counted; `cut` waits them out, so nothing is
    # delivered after it returns (a chunk that passed the check just before counted late).
    _gate: threading.Condition = field(default_factory=threading.Condition)
    _passing: int = 0

    @property
    def address(self) -> str:
        assert self._listener is not None
        host, port = self._listener.getsockname()[:2]
        return f"{host}:{port}"

    def start(self) -> LinkProxy:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._open.set()
        threading.Thread(target=self._accept, name="link-proxy", daemon=True).start()
        return self

    def cut(self) -> None:
        with self._gate:
            self._open.clear()
            self._gate.wait_for(lambda: self._passing == 0, timeout=60)

    def restore(self) -> None:
        with self._gate:
            self._open.set()
            self._gate.notify_all()

    def stop(self) -> None:
        self._closed.set()
        with self._gate:
            self._open.set()
            self._gate.notify_all()
        with self._lock:
            socks = [*self._socks, *([self._listener] if self._listener else [])]
        for s in socks:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def _track(self, s: socket.socket) -> None:
        with self._lock:
            self._socks.add(s)

    def _accept(self) -> None:
        assert self._listener is not None
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            self._track(client)
            threading.Thread(target=self._connect, args=(client,), daemon=True).start()

    def _connect(self, client: socket.socket) -> None:
        self._open.wait()  # a connection opened during the cut waits, like a SYN retransmitted
        try:
            host, _, port = self.upstream().strip().rpartition(":")
            server = socket.create_connection((host, int(port)), timeout=10)
        except OSError:
            client.close()
            return
        server.settimeout(None)
        self._track(server)
        threading.Thread(target=self._pump, args=(client, server), daemon=True).start()
        self._pump(server, client)

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(_CHUNK):
                with self._gate:
                    # Held, not dropped: what TCP delivers once the link is back.
                    self._gate.wait_for(self._open.is_set)
                    self._passing += 1
                try:
                    if self._closed.is_set():
                        break
                    dst.sendall(data)
                    with self._lock:
                        self.forwarded += len(data)
                finally:
                    with self._gate:
                        self._passing -= 1
                        self._gate.notify_all()
        except OSError:
            pass
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()
            with self._lock:
                self._socks.discard(s)
