"""A hollow component's own HTTP/1.1 connection to the server: what the load generator sends with.

A real component holds one keep-alive connection to the configuration server and sends one
request at a time. The generator used one httpx client per process for thousands of hollow
components; its shared pool scans every waiting request whenever a connection frees, so once the
server slowed down the generator spent milliseconds of CPU per heartbeat on the same 2 cores as
the server (`bench/results/scale.md`, *load generator CPU*). Here each hollow component has its own
connection, as a real one does, and writes a plain HTTP/1.1 request with its bearer token and JSON
body to the server's real API; the answer is read by its Content-Length. Plain HTTP on loopback,
or HTTPS verifying the server's CA when the bench runs the servers with `--tls`.
"""

from __future__ import annotations

import asyncio
import ssl
from dataclasses import dataclass
from urllib.parse import urlsplit


class HeartbeatError(Exception):
    """The connection failed or the answer was not HTTP (the connection is closed)."""


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes


class Connection:
    """One keep-alive connection, opened on first use and again after any failure."""

    def __init__(self, url: str, tls: ssl.SSLContext | None = None) -> None:
        parts = urlsplit(url)
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        if parts.scheme == "https" and tls is None:
            raise ValueError(f"{url}: HTTPS needs the server's CA (an SSL context that verifies it)")
        self.tls = tls if parts.scheme == "https" else None
        self._streams: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        self.opened = 0  # connections opened (the bench reports them per heartbeat)

    async def post(self, path: str, token: str, body: bytes, interval: float) -> Answer:
        """POST a heartbeat; `interval` is the component's, told to the server (`control.admission`)."""
        reused = self._streams is not None
        try:
            return await self._post(path, token, body, interval)
        except HeartbeatError:
            if not reused:
                raise
        # The server keeps an idle connection for `keep_alive_seconds` (75 s, beyond every idle
        # interval), but may close it (restarted, shed a burst): a real client's pool opens a new
        # one and sends again.
        return await self._post(path, token, body, interval)

    async def _post(self, path: str, token: str, body: bytes, interval: float) -> Answer:
        try:
            if self._streams is None:
                self.opened += 1
                self._streams = await asyncio.open_connection(
                    self.host, self.port, ssl=self.tls, server_hostname=self.host if self.tls else None
                )
            reader, writer = self._streams
            writer.write(
                f"POST {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
                f"Authorization: Bearer {token}\r\nContent-Type: application/json\r\n"
                f"X-Heartbeat-Interval: {interval:g}\r\n"
                f"Content-Length: {len(body)}\r\n\r\n".encode()
                + body
            )
            head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
            status = int(head[0].split(" ", 2)[1])
            headers = {}
            for line in head[1:]:
                name, sep, value = line.partition(":")
                if sep:
                    headers[name.strip().lower()] = value.strip()
            length = int(headers.get("content-length", "0"))
            answer = Answer(status, headers, await reader.readexactly(length))
        except (OSError, EOFError, asyncio.LimitOverrunError, ValueError, IndexError) as exc:
            self.close()
            raise HeartbeatError(repr(exc)) from exc
        except BaseException:  # cancelled (timed out) mid-request: the connection's state is unknown
            self.close()
            raise
        if headers.get("connection", "").lower() == "close":
            self.close()
        return answer

    def close(self) -> None:
        if self._streams is not None:
            self._streams[1].close()
            self._streams = None
