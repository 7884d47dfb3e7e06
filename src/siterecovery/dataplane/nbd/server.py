"""The NBD server: several exports by name over TCP and/or a Unix socket, in an asyncio loop.

`NbdServer` opens every export's image, listens, and hands each accepted socket to a `Connection`;
`ServerThread` runs one in its own event-loop thread for synchronous callers (the agent, the lab,
tests), and `run_nbd_server_in_thread` starts one.
"""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Sequence
from concurrent.futures import Future
from pathlib import Path

from siterecovery.dataplane.nbd.connection import Connection
from siterecovery.dataplane.nbd.image import Export, ExportImage, refused


class NbdServer:
    """Serves several exports by name over TCP and/or a Unix socket, in the running event loop."""

    def __init__(
        self,
        exports: Sequence[Export],
        *,
        tcp: tuple[str, int] | None = None,
        unix: Path | None = None,
    ) -> None:
        names = [e.name for e in exports]
        if not exports or len(set(names)) != len(names):
            raise refused(
                "nbd-export-invalid",
                f"Export names {names!r} are empty or repeated.",
                "Give every served disk its own name.",
            )
        if tcp is None and unix is None:
            raise refused(
                "nbd-listener-missing",
                "The NBD server was given neither a TCP address nor a Unix socket.",
                "Pass tcp=(host, port) and/or unix=path.",
            )
        self._export_list = tuple(exports)
        self._tcp = tcp
        self._unix = Path(unix) if unix is not None else None
        self._exports: dict[str, ExportImage] = {}
        self._connections: set[Connection] = set()
        self._servers: list[asyncio.Server] = []

    def _connect(self) -> Connection:
        return Connection(self._exports, self._connections)

    @property
    def tcp_port(self) -> int | None:
        for srv in self._servers:
            for sock in srv.sockets:
                if sock.family in (socket.AF_INET, socket.AF_INET6):
                    return int(sock.getsockname()[1])
        return None

    @property
    def unix_path(self) -> Path | None:
        return self._unix

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            for export in self._export_list:
                self._exports[export.name] = ExportImage(export)
            if self._tcp is not None:
                host, port = self._tcp
                self._servers.append(await loop.create_server(self._connect, host, port))
            if self._unix is not None:
                if self._unix.is_socket():
                    self._unix.unlink()
                self._servers.append(await loop.create_unix_server(self._connect, str(self._unix)))
        except BaseException:
            await self.stop()
            raise

    async def stop(self) -> None:
        """Stop listening, drop every connection and close the images."""
        for srv in self._servers:
            srv.close()
        for conn in list(self._connections):
            conn.close()
        for srv in self._servers:
            await srv.wait_closed()
        self._servers.clear()
        # Let the transports run their close callbacks before their images go away.
        await asyncio.sleep(0)
        for image in self._exports.values():
            image.close()
        self._exports.clear()
        if self._unix is not None and self._unix.is_socket():
            self._unix.unlink()


class ServerThread:
    """An `NbdServer` running in its own event-loop thread, for tests and synchronous code."""

    def __init__(self, server: NbdServer) -> None:
        self.server = server
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="nbd-server", daemon=True)
        self._thread.start()
        try:
            asyncio.run_coroutine_threadsafe(server.start(), self._loop).result()
        except BaseException:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join()
            self._loop.close()
            raise

    @property
    def tcp_port(self) -> int | None:
        return self.server.tcp_port

    @property
    def unix_path(self) -> Path | None:
        return self.server.unix_path

    def stop(self) -> None:
        if self._loop.is_closed():
            return
        done: Future[None] = asyncio.run_coroutine_threadsafe(self.server.stop(), self._loop)
        try:
            done.result(timeout=30)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join()
            self._loop.close()

    def __enter__(self) -> ServerThread:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def run_nbd_server_in_thread(
    exports: Sequence[Export],
    *,
    tcp: tuple[str, int] | None = None,
    unix: Path | None = None,
) -> ServerThread:
    """Start an NBD server for `exports` in a background thread; `.stop()` ends it."""
    return ServerThread(NbdServer(exports, tcp=tcp, unix=unix))
