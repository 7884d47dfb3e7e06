"""Mutual-TLS links between data-plane components: identities, listeners and connections.

A component's identity is the certificate the configuration server issued at registration, kept
in `<state_dir>/tls/` (`component.crt`, `component.key`, `ca.crt`). Its TLS contexts are made once
and reloaded in place when the certificate is renewed, so listeners and senders holding them
present the new certificate from their next handshake on. Listeners require a client
certificate from the same CA; a peer without one fails the handshake and never sees a frame.
Links use blocking sockets, one thread per connection: `SSLSocket.recv_into` into a reused buffer
releases the GIL, and avoids the extra copies of asyncio's memory-BIO TLS transport.
"""

from __future__ import annotations

import contextlib
import logging
import select
import socket
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from siterecovery import pki

log = logging.getLogger(__name__)

_SOCK_BUF = 4 << 20


@dataclass(eq=False)
class Identity:
    cert: Path
    key: Path
    ca: Path
    _server: ssl.SSLContext | None = field(default=None, init=False, repr=False)
    _client: ssl.SSLContext | None = field(default=None, init=False, repr=False)

    @classmethod
    def in_dir(cls, state_dir: Path) -> Identity:
        tls = state_dir / "tls"
        return cls(tls / "component.crt", tls / "component.key", tls / "ca.crt")

    def exists(self) -> bool:
        return self.cert.exists() and self.key.exists() and self.ca.exists()

    def write(self, issued: pki.IssuedCertificate) -> None:
        issued.write(self.cert.parent, "component")

    def server_context(self) -> ssl.SSLContext:
        if self._server is None:
            self._server = pki.server_context(self.cert, self.key, self.ca)
        return self._server

    def client_context(self) -> ssl.SSLContext:
        if self._client is None:
            self._client = pki.client_context(self.cert, self.key, self.ca)
        return self._client

    def reload(self) -> None:
        """Present the (renewed) certificate on disk from the next handshake on."""
        for ctx in (self._server, self._client):
            if ctx is not None:
                ctx.load_cert_chain(self.cert, self.key)


def parse_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"address {address!r} is not host:port")
    return host.strip("[]"), int(port)


def _tune(sock: socket.socket) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _SOCK_BUF)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _SOCK_BUF)


def connect(address: str, ctx: ssl.SSLContext, timeout: float = 10.0) -> ssl.SSLSocket:
    host, port = parse_address(address)
    raw = socket.create_connection((host, port), timeout=timeout)
    _tune(raw)
    try:
        tls = ctx.wrap_socket(raw, server_hostname=host)
    except BaseException:
        raw.close()
        raise
    tls.settimeout(None)
    return tls


def idle(sock: ssl.SSLSocket) -> bool:
    """True when nothing more is readable right now: the moment to sync and acknowledge."""
    if sock.pending():
        return False
    readable, _, _ = select.select([sock], [], [], 0)
    return not readable


def quiet_for(sock: ssl.SSLSocket, seconds: float) -> bool:
    """True when nothing becomes readable within `seconds` (0: `idle`)."""
    if sock.pending():
        return False
    readable, _, _ = select.select([sock], [], [], max(0.0, seconds))
    return not readable


class Listener:
    """Accepts mutual-TLS connections and hands each to `handler` in its own thread."""

    def __init__(
        self, address: str, ctx: ssl.SSLContext, handler: Callable[[ssl.SSLSocket, str], None]
    ) -> None:
        host, port = parse_address(address)
        self._sock = socket.create_server((host, port), reuse_port=False)
        self._ctx = ctx
        self._handler = handler
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._accept_loop, name=f"listen-{address}", daemon=True)
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()

    @property
    def address(self) -> str:
        host, port = self._sock.getsockname()[:2]
        return f"{host}:{port}"

    def start(self) -> None:
        self._thread.start()

    def _accept_loop(self) -> None:
        while not self._stopped.is_set():
            try:
                raw, peer = self._sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(raw, f"{peer[0]}:{peer[1]}"), daemon=True).start()

    def _serve(self, raw: socket.socket, peer: str) -> None:
        _tune(raw)
        raw.settimeout(10.0)
        try:
            tls = self._ctx.wrap_socket(raw, server_side=True)
        except (ssl.SSLError, OSError) as exc:
            log.warning("refused TLS connection from %s: %s", peer, exc)
            raw.close()
            return
        tls.settimeout(None)
        with self._lock:
            self._conns.add(tls)
        try:
            self._handler(tls, peer)
        except (OSError, ConnectionError) as exc:
            log.info("connection from %s ended: %s", peer, exc)
        finally:
            with self._lock:
                self._conns.discard(tls)
            tls.close()

    def stop(self) -> None:
        self._stopped.set()
        # shutdown wakes the thread blocked in accept(); close alone does not on Linux.
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()
        with self._lock:
            conns = list(self._conns)
        for c in conns:
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)
        self._thread.join(timeout=5)
