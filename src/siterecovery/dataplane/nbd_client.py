"""A small synchronous NBD client for the lab's guest workload and for tests.

It speaks the fixed-newstyle handshake with NBD_OPT_GO (falling back to nothing: a server without GO
is refused), then one request at a time with simple replies: READ, WRITE (FUA), FLUSH, TRIM,
WRITE_ZEROES and DISC, over TCP or a Unix socket. Requests larger than the server's maximum block
size are split. Offsets and lengths must be multiples of `min_block_size` (512 on the agent's
export); the server answers anything else with EINVAL, raised here as `NbdError`.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import struct
from pathlib import Path
from types import TracebackType

from siterecovery.dataplane.nbd import (
    IHAVEOPT,
    MAX_BLOCK_SIZE,
    NBDMAGIC,
    OPT_HEADER,
    OPT_REPLY,
    OPT_REPLY_MAGIC,
    REQUEST,
    REQUEST_MAGIC,
    SIMPLE_REPLY,
    SIMPLE_REPLY_MAGIC,
    Cmd,
    CmdFlag,
    HandshakeFlag,
    Info,
    Opt,
    Rep,
    TxFlag,
)
from siterecovery.errors import Problem, SiteRecoveryError, Status


class NbdError(SiteRecoveryError):
    """The server refused a request or the handshake; `errno` holds the NBD error value."""

    def __init__(self, code: str, message: str, remediation: str, error: int = errno.EIO) -> None:
        super().__init__(Problem(code, message, remediation), Status.UNPROCESSABLE)
        self.errno = error


class NbdClient:
    """One connection to one export; not thread-safe (one request in flight)."""

    def __init__(self, sock: socket.socket, export: str) -> None:
        self._sock = sock
        self.export = export
        self.size = 0
        self.flags = 0
        self.min_block_size = 1
        self.max_block_size = MAX_BLOCK_SIZE
        self._cookie = 0
        self._hdr = bytearray(SIMPLE_REPLY.size)
        self._handshake()

    @classmethod
    def connect(
        cls,
        export: str = "",
        *,
        unix: Path | str | None = None,
        host: str | None = None,
        port: int = 10809,
        timeout: float | None = 60.0,
    ) -> NbdClient:
        """Connect to `export` on a Unix socket path or a TCP host/port and negotiate it."""
        if unix is not None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            address: str | tuple[str, int] = os.fspath(unix)
        elif host is not None:
            sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            address = (host, port)
        else:
            raise NbdError(
                "nbd-address-missing",
                "No NBD server address was given.",
                "Pass unix=<socket path> or host=<address> (and port).",
            )
        sock.settimeout(timeout)
        try:
            sock.connect(address)
            return cls(sock, export)
        except BaseException:
            sock.close()
            raise

    # handshake

    def _recv_exact(self, n: int) -> bytes:
        buf = bytearray(n)
        self._recv_into(memoryview(buf))
        return bytes(buf)

    def _recv_into(self, view: memoryview) -> None:
        got = 0
        while got < len(view):
            n = self._sock.recv_into(view[got:])
            if n == 0:
                raise NbdError(
                    "nbd-connection-lost",
                    f"The NBD server closed the connection to export {self.export!r}.",
                    "Check that the server is running and serves this export.",
                )
            got += n

    def _handshake(self) -> None:
        magic, opt_magic, flags = struct.unpack(">QQH", self._recv_exact(18))
        if magic != NBDMAGIC or opt_magic != IHAVEOPT or not flags & HandshakeFlag.FIXED_NEWSTYLE:
            raise NbdError(
                "nbd-handshake-failed",
                f"The server for export {self.export!r} does not speak fixed-newstyle NBD.",
                "Point the client at an NBD server.",
            )
        self._sock.sendall(struct.pack(">I", HandshakeFlag.FIXED_NEWSTYLE | HandshakeFlag.NO_ZEROES))
        name = self.export.encode()
        data = struct.pack(">I", len(name)) + name + struct.pack(">HH", 1, Info.BLOCK_SIZE)
        self._sock.sendall(OPT_HEADER.pack(IHAVEOPT, Opt.GO, len(data)) + data)
        while True:
            magic, opt, rep, length = OPT_REPLY.unpack(self._recv_exact(OPT_REPLY.size))
            payload = self._recv_exact(length)
            if magic != OPT_REPLY_MAGIC or opt != Opt.GO:
                raise NbdError(
                    "nbd-handshake-failed",
                    f"The server sent a malformed reply while negotiating export {self.export!r}.",
                    "Check the server's logs.",
                )
            if rep == Rep.ACK:
                return
            if rep == Rep.INFO and len(payload) >= 2:
                (kind,) = struct.unpack_from(">H", payload)
                if kind == Info.EXPORT:
                    _, self.size, self.flags = struct.unpack(">HQH", payload)
                elif kind == Info.BLOCK_SIZE:
                    _, self.min_block_size, _, self.max_block_size = struct.unpack(">HIII", payload)
            elif rep & (1 << 31):
                code = "nbd-export-unknown" if rep == Rep.ERR_UNKNOWN else "nbd-handshake-failed"
                raise NbdError(
                    code,
                    f"The server refused export {self.export!r}: {payload.decode('utf-8', 'replace')}.",
                    "List the server's exports (nbdinfo --list) and use one of their names.",
                )

    # transmission

    def _request(self, cmd: Cmd, offset: int, length: int, flags: int = 0) -> None:
        self._cookie += 1
        self._sock.sendall(REQUEST.pack(REQUEST_MAGIC, flags, cmd, self._cookie, offset, length))

    def _check_reply(self, cmd: Cmd, offset: int, length: int) -> None:
        self._recv_into(memoryview(self._hdr))
        magic, error, cookie = SIMPLE_REPLY.unpack(self._hdr)
        if magic != SIMPLE_REPLY_MAGIC or cookie != self._cookie:
            raise NbdError(
                "nbd-protocol-error",
                f"The server sent an unexpected reply on export {self.export!r}.",
                "Check the server's logs.",
            )
        if error:
            raise NbdError(
                "nbd-request-failed",
                f"NBD {cmd.name} of {length} bytes at offset {offset} on export {self.export!r} failed: "
                f"{os.strerror(error)}.",
                f"Keep requests inside the {self.size}-byte export, aligned to {self.min_block_size} bytes.",
                error,
            )

    def pread(self, length: int, offset: int) -> bytes:
        buf = bytearray(length)
        self.readinto(memoryview(buf), offset)
        return bytes(buf)

    def readinto(self, view: memoryview, offset: int) -> None:
        """Fill `view` with the export's bytes from `offset`."""
        done = 0
        while done < len(view):
            n = min(len(view) - done, self.max_block_size)
            self._request(Cmd.READ, offset + done, n)
            self._check_reply(Cmd.READ, offset + done, n)
            self._recv_into(view[done : done + n])
            done += n

    def pwrite(self, data: bytes | bytearray | memoryview, offset: int, *, fua: bool = False) -> None:
        view = memoryview(data).cast("B")
        done = 0
        while done < len(view):
            n = min(len(view) - done, self.max_block_size)
            self._send_write(view[done : done + n], offset + done, CmdFlag.FUA if fua else 0)
            self._check_reply(Cmd.WRITE, offset + done, n)
            done += n

    def _send_write(self, chunk: memoryview, offset: int, flags: int) -> None:
        self._cookie += 1
        header = REQUEST.pack(REQUEST_MAGIC, flags, Cmd.WRITE, self._cookie, offset, len(chunk))
        # One syscall for header and payload; sendmsg may stop early, so finish what it did not send.
        sent = self._sock.sendmsg([header, chunk]) - len(header)
        if sent < 0:
            self._sock.sendall(memoryview(header)[len(header) + sent :])
            sent = 0
        if sent < len(chunk):
            self._sock.sendall(chunk[sent:])

    def flush(self) -> None:
        self._request(Cmd.FLUSH, 0, 0)
        self._check_reply(Cmd.FLUSH, 0, 0)

    def zero(self, offset: int, length: int, *, punch: bool = True, fua: bool = False) -> None:
        """Make the range read as zeroes; `punch=False` keeps it allocated (NO_HOLE)."""
        flags = (0 if punch else CmdFlag.NO_HOLE) | (CmdFlag.FUA if fua else 0)
        self._ranged(Cmd.WRITE_ZEROES, offset, length, flags)

    def trim(self, offset: int, length: int) -> None:
        self._ranged(Cmd.TRIM, offset, length, 0)

    def _ranged(self, cmd: Cmd, offset: int, length: int, flags: int) -> None:
        # Lengths are u32 on the wire; stay a whole number of blocks below that.
        step = (1 << 32) - (1 << 20)
        done = 0
        while done < length:
            n = min(length - done, step)
            self._request(cmd, offset + done, n, flags)
            self._check_reply(cmd, offset + done, n)
            done += n

    @property
    def read_only(self) -> bool:
        return bool(self.flags & TxFlag.READ_ONLY)

    def close(self) -> None:
        """Say goodbye (NBD_CMD_DISC) and close the socket."""
        if self._sock.fileno() < 0:
            return
        try:
            with contextlib.suppress(OSError):  # the server may already be gone; nothing to tell it
                self._request(Cmd.DISC, 0, 0)
        finally:
            self._sock.close()

    def __enter__(self) -> NbdClient:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
