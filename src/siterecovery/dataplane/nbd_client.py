"""A small synchronous NBD client for the lab's guest workload and for tests.

It speaks the fixed-newstyle handshake with NBD_OPT_GO (falling back to nothing: a server without GO
is refused), then one request at a time: READ, WRITE (FUA), FLUSH, TRIM, WRITE_ZEROES, BLOCK_STATUS
and DISC, over TCP or a Unix socket. Before GO it asks for structured replies and the
`base:allocation` meta context, so `block_status` can tell which ranges read as zeroes without
reading them (the lab oracle skips them: a check of a sparse disk costs its data, not its size). A
server that offers neither (an old one) still works: replies stay simple and `block_status` reports
the whole range as data, so callers fall back to reading everything. Replies of either kind are
accepted for any command, as the protocol allows. Requests larger than the server's maximum block
size are split. Offsets and lengths must be multiples of `min_block_size` (512 on the agent's
export); the server answers anything else with EINVAL, raised here as `NbdError`.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import struct
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from siterecovery.dataplane.nbd.wire import (
    BASE_ALLOCATION,
    IHAVEOPT,
    MAX_BLOCK_SIZE,
    NBDMAGIC,
    OPT_HEADER,
    OPT_REPLY,
    OPT_REPLY_MAGIC,
    REPLY_FLAG_DONE,
    REQUEST,
    REQUEST_MAGIC,
    SIMPLE_REPLY_MAGIC,
    STATE_HOLE,
    STATE_ZERO,
    STRUCTURED_REPLY_MAGIC,
    Cmd,
    CmdFlag,
    HandshakeFlag,
    Info,
    Opt,
    Rep,
    ReplyType,
    TxFlag,
)
from siterecovery.errors import Problem, SiteRecoveryError, Status


class NbdError(SiteRecoveryError):
    """The server refused a request or the handshake; `errno` holds the NBD error value."""

    def __init__(self, code: str, message: str, remediation: str, error: int = errno.EIO) -> None:
        super().__init__(Problem(code, message, remediation), Status.UNPROCESSABLE)
        self.errno = error


@dataclass(frozen=True)
class Extent:
    """One run of `base:allocation` block status: `length` bytes from `offset` with the same flags."""

    offset: int
    length: int
    flags: int  # STATE_HOLE | STATE_ZERO bits, as the server sent them

    @property
    def end(self) -> int:
        return self.offset + self.length

    @property
    def zero(self) -> bool:
        """Reads as zeroes (a hole of a raw image, or allocated zeroes); nothing to read here."""
        return bool(self.flags & STATE_ZERO)

    @property
    def hole(self) -> bool:
        return bool(self.flags & STATE_HOLE)


_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")
_SIMPLE_REST = struct.Struct(">IQ")  # error, cookie (after the magic)
_STRUCTURED_REST = struct.Struct(">HHQI")  # flags, type, cookie, length (after the magic)
_ERROR_HEAD = struct.Struct(">IH")  # error, message length
# BLOCK_STATUS lengths are u32 on the wire; ask a whole number of MiB below that.
_STATUS_STEP = (1 << 32) - (1 << 20)


class NbdClient:
    """One connection to one export; not thread-safe (one request in flight)."""

    def __init__(self, sock: socket.socket, export: str, *, structured: bool = True) -> None:
        self._sock = sock
        self.export = export
        self.size = 0
        self.flags = 0
        self.min_block_size = 1
        self.max_block_size = MAX_BLOCK_SIZE
        # What the server agreed to: structured replies, and the id it gave base:allocation.
        self.structured = False
        self._allocation_id: int | None = None
        self._cookie = 0
        self._handshake(structured)

    @classmethod
    def connect(
        cls,
        export: str = "",
        *,
        unix: Path | str | None = None,
        host: str | None = None,
        port: int = 10809,
        timeout: float | None = 60.0,
        structured: bool = True,
    ) -> NbdClient:
        """Connect to `export` on a Unix socket path or a TCP host/port and negotiate it.

        `structured=False` does not ask for structured replies (nor block status): the client then
        talks as to a server that offers neither.
        """
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
            return cls(sock, export, structured=structured)
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

    def _malformed(self) -> NbdError:
        return NbdError(
            "nbd-handshake-failed",
            f"The server sent a malformed reply while negotiating export {self.export!r}.",
            "Check the server's logs.",
        )

    def _option(self, opt: Opt, data: bytes) -> list[tuple[int, bytes]]:
        """Send one option; return its replies (type, payload) up to and including the final one."""
        self._sock.sendall(OPT_HEADER.pack(IHAVEOPT, opt, len(data)) + data)
        replies = []
        while True:
            magic, got_opt, rep, length = OPT_REPLY.unpack(self._recv_exact(OPT_REPLY.size))
            payload = self._recv_exact(length)
            if magic != OPT_REPLY_MAGIC or got_opt != opt:
                raise self._malformed()
            replies.append((rep, payload))
            if rep == Rep.ACK or rep & (1 << 31):
                return replies

    def _handshake(self, structured: bool) -> None:
        magic, opt_magic, flags = struct.unpack(">QQH", self._recv_exact(18))
        if magic != NBDMAGIC or opt_magic != IHAVEOPT or not flags & HandshakeFlag.FIXED_NEWSTYLE:
            raise NbdError(
                "nbd-handshake-failed",
                f"The server for export {self.export!r} does not speak fixed-newstyle NBD.",
                "Point the client at an NBD server.",
            )
        self._sock.sendall(struct.pack(">I", HandshakeFlag.FIXED_NEWSTYLE | HandshakeFlag.NO_ZEROES))
        name = self.export.encode()
        if structured:
            self._negotiate_block_status(name)
        data = struct.pack(">I", len(name)) + name + struct.pack(">HH", 1, Info.BLOCK_SIZE)
        for rep, payload in self._option(Opt.GO, data):
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

    def _negotiate_block_status(self, name: bytes) -> None:
        # A server without structured replies answers ERR_UNSUP (or another error): stay simple.
        if self._option(Opt.STRUCTURED_REPLY, b"")[-1][0] != Rep.ACK:
            return
        self.structured = True
        query = BASE_ALLOCATION.encode()
        data = _U32.pack(len(name)) + name + _U32.pack(1) + _U32.pack(len(query)) + query
        for rep, payload in self._option(Opt.SET_META_CONTEXT, data):
            if rep == Rep.META_CONTEXT and len(payload) >= 4 and payload[4:] == query:
                (self._allocation_id,) = _U32.unpack_from(payload)

    @property
    def can_block_status(self) -> bool:
        """True when the server agreed to report base:allocation for this export."""
        return self._allocation_id is not None

    # transmission

    def _request(self, cmd: Cmd, offset: int, length: int, flags: int = 0) -> None:
        self._cookie += 1
        self._sock.sendall(REQUEST.pack(REQUEST_MAGIC, flags, cmd, self._cookie, offset, length))

    def _check_reply(
        self,
        cmd: Cmd,
        offset: int,
        length: int,
        view: memoryview | None = None,
        extents: list[Extent] | None = None,
    ) -> None:
        """Read the reply to the request in flight: READ data into `view`, BLOCK_STATUS into `extents`.

        A structured reply may come in several chunks (data, holes, status, errors) ending with the
        one flagged DONE; an error chunk is raised only after the last chunk, so the connection stays
        in step for the next request.
        """
        (magic,) = _U32.unpack(self._recv_exact(4))
        if magic == SIMPLE_REPLY_MAGIC:
            error, cookie = _SIMPLE_REST.unpack(self._recv_exact(_SIMPLE_REST.size))
            self._check_cookie(cookie)
            if error:
                raise self._failed(cmd, offset, length, error)
            if view is not None:
                self._recv_into(view)
            return
        if magic != STRUCTURED_REPLY_MAGIC or not self.structured:
            raise self._protocol_error()
        failure = 0
        pos = offset  # where the next BLOCK_STATUS extent starts
        while True:
            flags, kind, cookie, size = _STRUCTURED_REST.unpack(self._recv_exact(_STRUCTURED_REST.size))
            self._check_cookie(cookie)
            if kind == ReplyType.OFFSET_DATA and view is not None and size >= 8:
                (at,) = _U64.unpack(self._recv_exact(8))
                self._recv_into(self._slice(view, offset, at, size - 8))
            elif kind == ReplyType.OFFSET_HOLE and view is not None and size == 12:
                at, hole = struct.unpack(">QI", self._recv_exact(12))
                piece = self._slice(view, offset, at, hole)
                piece[:] = bytes(len(piece))
            elif kind == ReplyType.BLOCK_STATUS and extents is not None and size >= 4 and size % 8 == 4:
                payload = self._recv_exact(size)
                if _U32.unpack_from(payload)[0] == self._allocation_id:
                    for i in range(4, size, 8):
                        ext_len, ext_flags = struct.unpack_from(">II", payload, i)
                        extents.append(Extent(pos, ext_len, ext_flags))
                        pos += ext_len
            elif kind & (1 << 15) and size >= _ERROR_HEAD.size:
                (failure, _) = _ERROR_HEAD.unpack(self._recv_exact(_ERROR_HEAD.size))
                self._recv_exact(size - _ERROR_HEAD.size)  # message, and the offset of ERROR_OFFSET
                failure = failure or errno.EIO
            elif kind == ReplyType.NONE and size == 0:
                pass
            else:
                raise self._protocol_error()
            if flags & REPLY_FLAG_DONE:
                break
            (magic,) = _U32.unpack(self._recv_exact(4))
            if magic != STRUCTURED_REPLY_MAGIC:
                raise self._protocol_error()
        if failure:
            raise self._failed(cmd, offset, length, failure)

    def _slice(self, view: memoryview, base: int, at: int, length: int) -> memoryview:
        if at < base or at + length > base + len(view):
            raise self._protocol_error()
        return view[at - base : at - base + length]

    def _check_cookie(self, cookie: int) -> None:
        if cookie != self._cookie:
            raise self._protocol_error()

    def _protocol_error(self) -> NbdError:
        return NbdError(
            "nbd-protocol-error",
            f"The server sent an unexpected reply on export {self.export!r}.",
            "Check the server's logs.",
        )

    def _failed(self, cmd: Cmd, offset: int, length: int, error: int) -> NbdError:
        return NbdError(
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
            self._check_reply(Cmd.READ, offset + done, n, view=view[done : done + n])
            done += n

    def block_status(self, offset: int = 0, length: int | None = None) -> list[Extent]:
        """The `base:allocation` extents covering [offset, offset + length) (default: to the end).

        Without block status (an old server) the whole range is one extent with no flags: data,
        to be read. Extents are clipped to the range; the server may describe it in any number of
        replies, each continuing where the last ended.
        """
        end = self.size if length is None else offset + length
        if not self.can_block_status:
            return [Extent(offset, end - offset, 0)] if end > offset else []
        out: list[Extent] = []
        pos = offset
        while pos < end:
            n = min(end - pos, _STATUS_STEP)
            got: list[Extent] = []
            self._request(Cmd.BLOCK_STATUS, pos, n)
            self._check_reply(Cmd.BLOCK_STATUS, pos, n, extents=got)
            if not got or got[0].length == 0:
                raise self._protocol_error()  # no progress: asking again would loop forever
            for ext in got:
                if ext.offset >= end:
                    break
                clipped = Extent(ext.offset, min(ext.end, end) - ext.offset, ext.flags)
                if out and out[-1].flags == clipped.flags and out[-1].end == clipped.offset:
                    out[-1] = Extent(out[-1].offset, out[-1].length + clipped.length, clipped.flags)
                else:
                    out.append(clipped)
            pos = out[-1].end
        return out

    def data_ranges(self, offset: int = 0, length: int | None = None) -> list[tuple[int, int]]:
        """(offset, length) ranges that may hold non-zero bytes: everything not reported as zeroes."""
        ranges: list[tuple[int, int]] = []
        for ext in self.block_status(offset, length):
            if ext.zero:
                continue
            if ranges and sum(ranges[-1]) == ext.offset:
                ranges[-1] = (ranges[-1][0], ranges[-1][1] + ext.length)
            else:
                ranges.append((ext.offset, ext.length))
        return ranges

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
