"""A minimal NBD client written from the protocol document, with the standard library only.

The fault suite's writer must not share code with the product it judges: if siterecovery's NBD
server and client agreed on a misreading of the protocol, a writer built on the product's client
would not notice. This client speaks the fixed-newstyle handshake, NBD_OPT_GO and simple replies,
and offers only what the writer needs: WRITE, FLUSH and a clean disconnect.
"""

from __future__ import annotations

import contextlib
import socket
import struct
from dataclasses import dataclass

NBDMAGIC = 0x4E42444D41474943  # "NBDMAGIC"
IHAVEOPT = 0x49484156454F5054  # "IHAVEOPT"
OPT_REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698

FLAG_FIXED_NEWSTYLE = 1
FLAG_NO_ZEROES = 2
OPT_GO = 7
REP_ACK = 1
REP_INFO = 3
INFO_EXPORT = 0
CMD_WRITE = 1
CMD_DISC = 2
CMD_FLUSH = 3
TX_SEND_FLUSH = 1 << 2


class NbdError(OSError):
    """The server refused a request or broke the protocol (a dead socket raises OSError as is)."""


@dataclass
class NbdClient:
    """One connection to one export over a Unix socket."""

    path: str
    export: str
    timeout: float = 30.0
    size: int = 0
    flags: int = 0
    _sock: socket.socket | None = None
    _cookie: int = 0

    def connect(self) -> NbdClient:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        try:
            s.connect(self.path)
            self._sock = s
            self._handshake()
        except BaseException:
            s.close()
            self._sock = None
            raise
        return self

    def close(self) -> None:
        if self._sock is None:
            return
        with contextlib.suppress(OSError):
            self._sock.sendall(struct.pack(">IHHQQI", REQUEST_MAGIC, 0, CMD_DISC, self._next(), 0, 0))
        self._sock.close()
        self._sock = None

    def __enter__(self) -> NbdClient:
        return self.connect()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- wire helpers ---------------------------------------------------------------------------

    def _recv(self, n: int) -> bytes:
        assert self._sock is not None
        buf = bytearray()
        while len(buf) < n:
            chunk = self._sock.recv(n - len(buf))
            if not chunk:
                raise ConnectionResetError("NBD server closed the connection")
            buf += chunk
        return bytes(buf)

    def _next(self) -> int:
        self._cookie += 1
        return self._cookie

    def _handshake(self) -> None:
        assert self._sock is not None
        magic, opt_magic, hflags = struct.unpack(">QQH", self._recv(18))
        if magic != NBDMAGIC or opt_magic != IHAVEOPT or not hflags & FLAG_FIXED_NEWSTYLE:
            raise NbdError(f"not a fixed-newstyle NBD server (flags {hflags:#x})")
        self._sock.sendall(struct.pack(">I", FLAG_FIXED_NEWSTYLE | (hflags & FLAG_NO_ZEROES)))
        name = self.export.encode()
        data = struct.pack(">I", len(name)) + name + struct.pack(">H", 0)
        self._sock.sendall(struct.pack(">QII", IHAVEOPT, OPT_GO, len(data)) + data)
        while True:
            rmagic, opt, rep, length = struct.unpack(">QIII", self._recv(20))
            payload = self._recv(length)
            if rmagic != OPT_REPLY_MAGIC or opt != OPT_GO:
                raise NbdError(f"bad option reply {rmagic:#x} for option {opt}")
            if rep == REP_INFO and len(payload) >= 12 and struct.unpack(">H", payload[:2])[0] == INFO_EXPORT:
                self.size, self.flags = struct.unpack(">QH", payload[2:12])
            elif rep == REP_ACK:
                break
            elif rep & (1 << 31):
                raise NbdError(f"NBD_OPT_GO refused ({rep:#x}): {payload!r}")
        if not self.size:
            raise NbdError("the server sent no NBD_INFO_EXPORT")

    def _request(self, cmd: int, offset: int, data: bytes = b"", length: int | None = None) -> None:
        if self._sock is None:
            raise ConnectionResetError("not connected")
        cookie = self._next()
        n = len(data) if length is None else length
        self._sock.sendall(struct.pack(">IHHQQI", REQUEST_MAGIC, 0, cmd, cookie, offset, n) + data)
        magic, error, got = struct.unpack(">IIQ", self._recv(16))
        if magic != SIMPLE_REPLY_MAGIC or got != cookie:
            raise NbdError(f"bad reply magic {magic:#x} / cookie {got} (sent {cookie})")
        if error:
            raise NbdError(f"NBD command {cmd} at {offset} failed with error {error}")

    # ---- commands -------------------------------------------------------------------------------

    def write(self, offset: int, data: bytes) -> None:
        self._request(CMD_WRITE, offset, data)

    def flush(self) -> None:
        if not self.flags & TX_SEND_FLUSH:
            raise NbdError("the export does not accept NBD_CMD_FLUSH")
        self._request(CMD_FLUSH, 0, length=0)
