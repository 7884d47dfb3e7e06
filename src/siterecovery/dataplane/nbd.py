"""The mobility agent's NBD export: each protected disk served as an NBD server, every write captured.

Any NBD client (QEMU, `qemu-io`, `qemu-img`, `nbdcopy`, `fio --ioengine=nbd`) uses the export as the
machine's disk. The server speaks the fixed-newstyle handshake (LIST, INFO, GO, EXPORT_NAME, ABORT,
STRUCTURED_REPLY, LIST/SET_META_CONTEXT `base:allocation`) and the transmission commands READ, WRITE
(FUA), FLUSH, TRIM, WRITE_ZEROES (NO_HOLE), BLOCK_STATUS and DISC. Every connection is an asyncio
`BufferedProtocol` that receives straight into one reusable buffer and applies requests in the
event-loop thread: writes of all connections to an export therefore reach the image and the
`CaptureSink` in one order without a lock, and a write's payload goes from the socket to `pwrite`
and the sink as a `memoryview` without a copy. Zero writes and trims punch holes so the image stays
sparse. A client's mistake (bad range, alignment, flag, command) is answered with an NBD error;
only a broken framing (bad magic) ends a connection, as the protocol requires.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import logging
import os
import socket
import stat
import struct
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from enum import IntEnum, IntFlag
from pathlib import Path

from siterecovery.dataplane.before_image import BeforeImageLog
from siterecovery.dataplane.capture import CaptureSink, WriteIntent
from siterecovery.dataplane.fileio import FALLOC_FL_KEEP_SIZE as _FALLOC_FL_KEEP_SIZE
from siterecovery.dataplane.fileio import FALLOC_FL_PUNCH_HOLE as _FALLOC_FL_PUNCH_HOLE
from siterecovery.dataplane.fileio import ZERO_CHUNK as _ZERO_CHUNK
from siterecovery.dataplane.fileio import ZERO_VIEW as _ZERO_VIEW
from siterecovery.dataplane.fileio import fallocate as _fallocate
from siterecovery.dataplane.fileio import is_zero, pread_zero_filled
from siterecovery.errors import Problem, SiteRecoveryError, Status

log = logging.getLogger(__name__)

NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
OPT_REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

MIN_BLOCK_SIZE = 512
PREFERRED_BLOCK_SIZE = 4096
MAX_BLOCK_SIZE = 32 * 1024 * 1024
BASE_ALLOCATION = "base:allocation"
# The id we hand out for base:allocation; any u32 works, the client only echoes it back.
BASE_ALLOCATION_ID = 1
# Option payloads are names and short lists; anything larger is refused (and skipped) unread.
MAX_OPTION_LENGTH = 64 * 1024
# Keeps one BLOCK_STATUS reply small; the client asks again from where the reply ended.
MAX_EXTENTS = 1024


class HandshakeFlag(IntFlag):
    FIXED_NEWSTYLE = 1 << 0
    NO_ZEROES = 1 << 1


class Opt(IntEnum):
    EXPORT_NAME = 1
    ABORT = 2
    LIST = 3
    STARTTLS = 5
    INFO = 6
    GO = 7
    STRUCTURED_REPLY = 8
    LIST_META_CONTEXT = 9
    SET_META_CONTEXT = 10


class Rep(IntEnum):
    ACK = 1
    SERVER = 2
    INFO = 3
    META_CONTEXT = 4
    ERR_UNSUP = (1 << 31) + 1
    ERR_POLICY = (1 << 31) + 2
    ERR_INVALID = (1 << 31) + 3
    ERR_PLATFORM = (1 << 31) + 4
    ERR_TLS_REQD = (1 << 31) + 5
    ERR_UNKNOWN = (1 << 31) + 6
    ERR_SHUTDOWN = (1 << 31) + 7
    ERR_BLOCK_SIZE_REQD = (1 << 31) + 8
    ERR_TOO_BIG = (1 << 31) + 9


class Info(IntEnum):
    EXPORT = 0
    NAME = 1
    DESCRIPTION = 2
    BLOCK_SIZE = 3


class TxFlag(IntFlag):
    HAS_FLAGS = 1 << 0
    READ_ONLY = 1 << 1
    SEND_FLUSH = 1 << 2
    SEND_FUA = 1 << 3
    ROTATIONAL = 1 << 4
    SEND_TRIM = 1 << 5
    SEND_WRITE_ZEROES = 1 << 6
    SEND_DF = 1 << 7
    CAN_MULTI_CONN = 1 << 8


class Cmd(IntEnum):
    READ = 0
    WRITE = 1
    DISC = 2
    FLUSH = 3
    TRIM = 4
    CACHE = 5
    WRITE_ZEROES = 6
    BLOCK_STATUS = 7


class CmdFlag(IntFlag):
    FUA = 1 << 0
    NO_HOLE = 1 << 1
    DF = 1 << 2
    REQ_ONE = 1 << 3
    FAST_ZERO = 1 << 4


class ReplyType(IntEnum):
    NONE = 0
    OFFSET_DATA = 1
    OFFSET_HOLE = 2
    BLOCK_STATUS = 5
    ERROR = (1 << 15) + 1
    ERROR_OFFSET = (1 << 15) + 2


class NbdErrno(IntEnum):
    """Error values allowed on the wire (the protocol fixes them, whatever the host's errno)."""

    EPERM = 1
    EIO = 5
    ENOMEM = 12
    EINVAL = 22
    ENOSPC = 28
    EOVERFLOW = 75
    ENOTSUP = 95
    ESHUTDOWN = 108


REPLY_FLAG_DONE = 1
STATE_HOLE = 1
STATE_ZERO = 2

OPT_HEADER = struct.Struct(">QII")
OPT_REPLY = struct.Struct(">QIII")
REQUEST = struct.Struct(">IHHQQI")
SIMPLE_REPLY = struct.Struct(">IIQ")
STRUCTURED_REPLY = struct.Struct(">IHHQI")
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")
_EXTENT = struct.Struct(">II")
_INFO_EXPORT = struct.Struct(">HQH")
_INFO_BLOCK_SIZE = struct.Struct(">HIII")
_OFFSET_DATA_HEADER = struct.Struct(">IHHQIQ")

_TX_FLAGS_RW = (
    TxFlag.HAS_FLAGS
    | TxFlag.SEND_FLUSH
    | TxFlag.SEND_FUA
    | TxFlag.SEND_TRIM
    | TxFlag.SEND_WRITE_ZEROES
    # Correct because every connection to an export shares one file descriptor and one sink, and
    # a FLUSH syncs both: it makes durable every write completed on any connection.
    | TxFlag.CAN_MULTI_CONN
)
_TX_FLAGS_RO = TxFlag.HAS_FLAGS | TxFlag.READ_ONLY | TxFlag.SEND_FLUSH | TxFlag.CAN_MULTI_CONN

# Plain ints for the per-request path: comparing against enum members costs an attribute lookup.
_READ, _WRITE, _DISC, _FLUSH = int(Cmd.READ), int(Cmd.WRITE), int(Cmd.DISC), int(Cmd.FLUSH)
_TRIM, _WRITE_ZEROES, _BLOCK_STATUS = int(Cmd.TRIM), int(Cmd.WRITE_ZEROES), int(Cmd.BLOCK_STATUS)
_FUA, _NO_HOLE, _REQ_ONE = int(CmdFlag.FUA), int(CmdFlag.NO_HOLE), int(CmdFlag.REQ_ONE)
_ALLOWED_FLAGS = {
    _READ: 0,
    _WRITE: _FUA,
    _FLUSH: 0,
    _TRIM: _FUA,
    _WRITE_ZEROES: _FUA | _NO_HOLE,
    _BLOCK_STATUS: _REQ_ONE,
}
_MODIFY = (_WRITE, _TRIM, _WRITE_ZEROES)
_EIO, _EINVAL, _ENOSPC, _EPERM = int(NbdErrno.EIO), int(NbdErrno.EINVAL), int(NbdErrno.ENOSPC), 1


def _to_nbd_errno(exc: OSError) -> int:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return _ENOSPC
    if exc.errno in (errno.EPERM, errno.EACCES, errno.EROFS):
        return _EPERM
    return _EIO


def _refused(code: str, message: str, remediation: str) -> SiteRecoveryError:
    return SiteRecoveryError(Problem(code, message, remediation), Status.UNPROCESSABLE)


@dataclass(frozen=True)
class Export:
    """One disk served under `name`: a raw image of exactly `size` bytes and where its writes go."""

    name: str
    path: Path
    size: int
    sink: CaptureSink | None = None
    read_only: bool = False
    min_block_size: int = MIN_BLOCK_SIZE
    intent: WriteIntent | None = None  # marked before each write reaches the image

    @classmethod
    def for_image(
        cls,
        name: str,
        path: Path,
        sink: CaptureSink | None = None,
        *,
        read_only: bool = False,
        intent: WriteIntent | None = None,
    ) -> Export:
        """The export of an existing image, sized from the file."""
        return cls(name, Path(path), os.stat(path).st_size, sink, read_only, intent=intent)


class _Image:
    """The open image of one export: positional I/O, hole punching, allocation extents."""

    def __init__(self, export: Export) -> None:
        if export.min_block_size not in (1, 512, 4096):
            raise _refused(
                "nbd-export-invalid",
                f"Export {export.name!r} asks for a minimum block size of {export.min_block_size}.",
                "Use 1, 512 or 4096.",
            )
        if export.size <= 0 or export.size % export.min_block_size:
            raise _refused(
                "nbd-export-invalid",
                f"Export {export.name!r} has size {export.size}, not a positive multiple of "
                f"{export.min_block_size}.",
                "Resize the image to a whole number of blocks.",
            )
        flags = (os.O_RDONLY if export.read_only else os.O_RDWR) | os.O_CLOEXEC
        try:
            self.fd = os.open(export.path, flags)
        except OSError as exc:
            raise _refused(
                "nbd-export-invalid",
                f"Image {export.path} of export {export.name!r} cannot be opened: {exc.strerror}.",
                "Create the image file or fix its permissions.",
            ) from exc
        st = os.fstat(self.fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size != export.size:
            os.close(self.fd)
            raise _refused(
                "nbd-export-invalid",
                f"Image {export.path} of export {export.name!r} is not a regular file of {export.size} "
                f"bytes (it has {st.st_size}).",
                "Serve the image with its real size (Export.for_image reads it).",
            )
        self.export = export
        self.size = export.size
        self.sink = export.sink
        self.intent = export.intent
        self.can_punch = _fallocate is not None
        # A snapshot of the disk is kept as a before-image log: old chunks go there before writes.
        self.before: BeforeImageLog | None = None
        if not export.read_only:
            try:
                self.before = BeforeImageLog.open_for(export.path, self.fd)
            except BaseException:
                os.close(self.fd)
                raise

    def close(self) -> None:
        if self.before is not None:
            self.before.close()
        if self.intent is not None:
            self.flush()  # so a clean stop leaves nothing for the write-intent log to compare
            self.intent.close()
        os.close(self.fd)

    def _intend(self, offset: int, length: int) -> None:
        # The connection marked its queued requests' extents in one go; this is the bit test.
        if self.intent is not None and not self.intent.covers(offset, length):
            self.intent.mark([(offset, length)], self.flush)

    def write(self, offset: int, data: memoryview) -> None:
        """Apply a write, then record it; an all-zero payload becomes a hole."""
        if is_zero(data):
            self.zero(offset, len(data), punch=True)
            return
        self._intend(offset, len(data))
        if self.before is not None and self.before.active:
            self.before.preserve(offset, len(data))
        written = os.pwrite(self.fd, data, offset)
        while written < len(data):
            written += os.pwrite(self.fd, data[written:], offset + written)
        if self.sink is not None:
            self.sink.record_write(offset, data)
        if self.intent is not None:
            self.intent.recorded(offset, len(data))

    def zero(self, offset: int, length: int, *, punch: bool) -> None:
        """Make the range read as zeroes (a hole unless `punch` is false), then record it."""
        self._intend(offset, length)
        if self.before is not None and self.before.active:
            self.before.preserve(offset, length)
        if punch and self.can_punch:
            self._punch(offset, length)
        else:
            self._write_zeroes(offset, length)
        if self.sink is not None:
            self.sink.record_zero(offset, length)
        if self.intent is not None:
            self.intent.recorded(offset, length)

    def flush(self) -> None:
        checkpoint = self.intent.checkpoint() if self.intent is not None else 0
        os.fdatasync(self.fd)
        if self.sink is not None:
            self.sink.flush()
        if self.intent is not None:
            self.intent.flushed(checkpoint)

    def _punch(self, offset: int, length: int) -> None:
        assert _fallocate is not None
        if _fallocate(self.fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length) == 0:
            return
        err = ctypes.get_errno()
        if err not in (errno.EOPNOTSUPP, errno.ENOSYS):
            raise OSError(err, os.strerror(err))
        # The file system cannot punch holes: remember it and write zeroes from now on.
        self.can_punch = False
        self._write_zeroes(offset, length)

    def _write_zeroes(self, offset: int, length: int) -> None:
        end = offset + length
        while offset < end:
            offset += os.pwrite(self.fd, _ZERO_VIEW[: min(_ZERO_CHUNK, end - offset)], offset)

    def read_into(self, view: memoryview, offset: int) -> None:
        # Past the end reads as zeroes (only if the image shrank under us).
        pread_zero_filled(self.fd, view, offset)

    def extents(self, offset: int, length: int, max_extents: int) -> list[tuple[int, int]]:
        """(length, base:allocation flags) runs from `offset`, from SEEK_DATA/SEEK_HOLE."""
        end = offset + length
        out: list[tuple[int, int]] = []
        pos = offset
        # A descriptor length is a u32; keep each a whole number of 4 KiB blocks.
        cap = 0xFFFFF000
        while pos < end and len(out) < max_extents:
            try:
                data = os.lseek(self.fd, pos, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:  # no data from pos to the end of the file
                    data = end
                elif exc.errno == errno.EINVAL:  # no SEEK_DATA here: report allocated
                    return [(min(length, cap), 0)]
                else:
                    raise
            if data > pos:
                stop, flags = min(data, end, pos + cap), STATE_HOLE | STATE_ZERO
            else:
                hole = os.lseek(self.fd, pos, os.SEEK_HOLE)
                stop, flags = min(hole, end, pos + cap), 0
            if out and out[-1][1] == flags and out[-1][0] + (stop - pos) <= cap:
                out[-1] = (out[-1][0] + stop - pos, flags)
            else:
                out.append((stop - pos, flags))
            pos = stop
        return out


class _ProtocolViolation(Exception):
    """The byte stream cannot be parsed any more; the connection must end."""


_S_FLAGS, _S_OPTIONS, _S_TRANSMISSION, _S_CLOSED = range(4)


class _Connection(asyncio.BufferedProtocol):
    """One client: the handshake, then requests parsed in place from one reusable buffer."""

    def __init__(self, server: NbdServer) -> None:
        self._server = server
        self._transport: asyncio.Transport | None = None
        # One request header plus the largest payload always fits, so a message never straddles
        # the end of the buffer once the partial bytes before it are moved to the front.
        self._buf = bytearray(MAX_BLOCK_SIZE + 256 * 1024)
        self._view = memoryview(self._buf)
        self._start = 0
        self._end = 0
        self._state = _S_FLAGS
        self._discard = 0
        self._after_discard: Callable[[], None] | None = None
        self._no_zeroes = False
        self._structured = False
        self._meta_export: str | None = None
        self._image: _Image | None = None
        self._block = 1
        self._out = bytearray()
        self._rbuf = bytearray(32 + PREFERRED_BLOCK_SIZE)
        self._paused = False

    # asyncio callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        self._server._connections.add(self)
        transport.write(
            struct.pack(">QQH", NBDMAGIC, IHAVEOPT, HandshakeFlag.FIXED_NEWSTYLE | HandshakeFlag.NO_ZEROES)
        )

    def connection_lost(self, exc: Exception | None) -> None:
        self._state = _S_CLOSED
        self._server._connections.discard(self)
        self._transport = None

    def pause_writing(self) -> None:
        # The client is not reading its replies: stop taking requests so memory stays bounded.
        self._paused = True
        if self._transport is not None:
            self._transport.pause_reading()

    def resume_writing(self) -> None:
        self._paused = False
        if self._transport is not None:
            self._transport.resume_reading()
            # Requests already received were left in the buffer while paused; the client may be
            # waiting for their replies and send nothing more, so take them up now.
            asyncio.get_running_loop().call_soon(self.buffer_updated, 0)

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._end == len(self._buf):
            self._compact()
        return self._view[self._end :]

    def buffer_updated(self, nbytes: int) -> None:
        self._end += nbytes
        try:
            self._consume()
        except _ProtocolViolation as exc:
            log.warning("nbd: closing connection: %s", exc)
            self._send_out()
            self.close()
            return
        self._send_out()

    def eof_received(self) -> bool | None:
        return None

    def close(self) -> None:
        self._state = _S_CLOSED
        if self._transport is not None:
            self._transport.close()

    # parsing

    def _compact(self) -> None:
        n = self._end - self._start
        if self._start:
            self._view[:n] = self._view[self._start : self._end]
        self._start, self._end = 0, n

    def _need(self, total: int) -> None:
        """Wait for `total` bytes of the current message, making room for them if needed."""
        if self._start + total > len(self._buf):
            self._compact()

    def _consume(self) -> None:
        buf, view = self._buf, self._view
        while self._state != _S_CLOSED:
            avail = self._end - self._start
            if self._discard:
                take = min(avail, self._discard)
                self._start += take
                self._discard -= take
                if self._discard:
                    break
                then, self._after_discard = self._after_discard, None
                if then is not None:
                    then()
                continue
            if self._state == _S_TRANSMISSION:
                if avail < 28:
                    break
                magic, flags, cmd, cookie, offset, length = REQUEST.unpack_from(buf, self._start)
                if magic != REQUEST_MAGIC:
                    raise _ProtocolViolation(f"bad request magic {magic:#x}")
                intent = self._image.intent if self._image is not None else None
                if intent is not None and cmd in _MODIFY and not intent.covers(offset, length):
                    self._mark_queued(intent)
                before = self._image.before if self._image is not None else None
                if before is not None and cmd in _MODIFY and not before.covers(offset, length):
                    with contextlib.suppress(OSError):  # the request's own preserve reports it
                        before.preserve_all(self._queued_ranges())
                if cmd == _WRITE:
                    if length > MAX_BLOCK_SIZE:
                        self._start += 28
                        self._discard = length
                        self._after_discard = self._reply_error_later(cookie, _EINVAL, _WRITE)
                        continue
                    if avail < 28 + length:
                        self._need(28 + length)
                        break
                    begin = self._start + 28
                    self._start = begin + length
                    self._do_write(flags, cookie, offset, view[begin : begin + length])
                else:
                    self._start += 28
                    self._command(cmd, flags, cookie, offset, length)
                if self._paused:
                    break
            elif self._state == _S_OPTIONS:
                if avail < 16:
                    break
                magic, opt, length = OPT_HEADER.unpack_from(buf, self._start)
                if magic != IHAVEOPT:
                    raise _ProtocolViolation(f"bad option magic {magic:#x}")
                if length > MAX_OPTION_LENGTH:
                    self._start += 16
                    self._discard = length
                    self._after_discard = lambda opt=opt: self._opt_reply(
                        opt, Rep.ERR_TOO_BIG, b"option data too long"
                    )
                    continue
                if avail < 16 + length:
                    self._need(16 + length)
                    break
                data = bytes(view[self._start + 16 : self._start + 16 + length])
                self._start += 16 + length
                self._option(opt, data)
            else:
                if avail < 4:
                    break
                (client_flags,) = _U32.unpack_from(buf, self._start)
                self._start += 4
                if not client_flags & HandshakeFlag.FIXED_NEWSTYLE:
                    raise _ProtocolViolation("client does not speak fixed newstyle")
                self._no_zeroes = bool(client_flags & HandshakeFlag.NO_ZEROES)
                self._state = _S_OPTIONS
        if self._start == self._end:
            self._start = self._end = 0

    def _mark_queued(self, intent: WriteIntent) -> None:
        """Mark the ranges of every modifying request already received, with one fdatasync."""
        assert self._image is not None
        intent.mark(self._queued_ranges(), self._image.flush)

    def _queued_ranges(self) -> list[tuple[int, int]]:
        """The disk ranges of the modifying requests already received, from the current one on."""
        image = self._image
        assert image is not None
        ranges: list[tuple[int, int]] = []
        pos = self._start
        while pos + 28 <= self._end:
            magic, _flags, cmd, _cookie, offset, length = REQUEST.unpack_from(self._buf, pos)
            if magic != REQUEST_MAGIC:
                break
            if cmd in _MODIFY and length and offset < image.size:
                ranges.append((offset, min(length, image.size - offset)))
            pos += 28 + (length if cmd == _WRITE else 0)
        return ranges

    def _send_out(self) -> None:
        if self._out and self._transport is not None:
            # Hand the batch over rather than reuse it: a transport may keep a reference to it.
            out, self._out = self._out, bytearray()
            self._transport.write(out)

    # handshake

    def _opt_reply(self, opt: int, rep: int, data: bytes = b"") -> None:
        self._out += OPT_REPLY.pack(OPT_REPLY_MAGIC, opt, rep, len(data))
        self._out += data

    def _option(self, opt: int, data: bytes) -> None:
        exports = self._server._exports
        if opt == Opt.EXPORT_NAME:
            image = exports.get(data.decode("utf-8", "replace")) or self._default_export(data)
            if image is None:
                # This old option has no way to say "no such export" but hanging up.
                raise _ProtocolViolation(f"unknown export {data!r} in NBD_OPT_EXPORT_NAME")
            self._out += _U64.pack(image.size) + _U16.pack(self._tx_flags(image))
            if not self._no_zeroes:
                self._out += bytes(124)
            self._enter_transmission(image)
        elif opt == Opt.ABORT:
            self._opt_reply(opt, Rep.ACK)
            self._send_out()
            self.close()
        elif opt == Opt.LIST:
            if data:
                self._opt_reply(opt, Rep.ERR_INVALID, b"NBD_OPT_LIST takes no data")
                return
            for name in exports:
                raw = name.encode()
                self._opt_reply(opt, Rep.SERVER, _U32.pack(len(raw)) + raw)
            self._opt_reply(opt, Rep.ACK)
        elif opt in (Opt.INFO, Opt.GO):
            self._info_or_go(opt, data)
        elif opt == Opt.STRUCTURED_REPLY:
            if data:
                self._opt_reply(opt, Rep.ERR_INVALID, b"NBD_OPT_STRUCTURED_REPLY takes no data")
                return
            self._structured = True
            self._opt_reply(opt, Rep.ACK)
        elif opt in (Opt.LIST_META_CONTEXT, Opt.SET_META_CONTEXT):
            self._meta_context(opt, data)
        else:
            self._opt_reply(opt, Rep.ERR_UNSUP, f"option {opt} is not supported".encode())

    def _default_export(self, raw_name: bytes) -> _Image | None:
        # The empty name is the protocol's "default export": ours is the first one configured.
        if raw_name:
            return None
        return next(iter(self._server._exports.values()), None)

    def _tx_flags(self, image: _Image) -> int:
        return int(_TX_FLAGS_RO if image.export.read_only else _TX_FLAGS_RW)

    def _info_or_go(self, opt: int, data: bytes) -> None:
        if len(data) < 6:
            self._opt_reply(opt, Rep.ERR_INVALID, b"option data too short")
            return
        (name_len,) = _U32.unpack_from(data, 0)
        if 4 + name_len + 2 > len(data):
            self._opt_reply(opt, Rep.ERR_INVALID, b"export name length exceeds the option data")
            return
        raw = data[4 : 4 + name_len]
        (n_info,) = _U16.unpack_from(data, 4 + name_len)
        if 6 + name_len + 2 * n_info != len(data):
            self._opt_reply(opt, Rep.ERR_INVALID, b"information request count does not match the data")
            return
        wanted = {_U16.unpack_from(data, 6 + name_len + 2 * i)[0] for i in range(n_info)}
        name = raw.decode("utf-8", "replace")
        image = self._server._exports.get(name) or self._default_export(raw)
        if image is None:
            self._opt_reply(opt, Rep.ERR_UNKNOWN, f"no export named {name!r}".encode())
            return
        self._opt_reply(opt, Rep.INFO, _INFO_EXPORT.pack(Info.EXPORT, image.size, self._tx_flags(image)))
        if Info.NAME in wanted:
            real = image.export.name.encode()
            self._opt_reply(opt, Rep.INFO, _U16.pack(Info.NAME) + real)
        # Sent whether asked or not: a client that ignores it still gets errors, not corruption.
        self._opt_reply(
            opt,
            Rep.INFO,
            _INFO_BLOCK_SIZE.pack(
                Info.BLOCK_SIZE, image.export.min_block_size, PREFERRED_BLOCK_SIZE, MAX_BLOCK_SIZE
            ),
        )
        self._opt_reply(opt, Rep.ACK)
        if opt == Opt.GO:
            if self._meta_export is not None and self._meta_export != image.export.name:
                self._meta_export = None
            self._enter_transmission(image)

    def _meta_context(self, opt: int, data: bytes) -> None:
        if not self._structured:
            self._opt_reply(opt, Rep.ERR_INVALID, b"negotiate NBD_OPT_STRUCTURED_REPLY first")
            return
        try:
            (name_len,) = _U32.unpack_from(data, 0)
            name = data[4 : 4 + name_len].decode("utf-8", "replace")
            (n_queries,) = _U32.unpack_from(data, 4 + name_len)
            pos = 8 + name_len
            queries = []
            for _ in range(n_queries):
                (qlen,) = _U32.unpack_from(data, pos)
                if pos + 4 + qlen > len(data):
                    raise struct.error("query longer than the option data")
                queries.append(data[pos + 4 : pos + 4 + qlen].decode("utf-8", "replace"))
                pos += 4 + qlen
            if pos != len(data):
                raise struct.error("trailing bytes after the queries")
        except struct.error:
            self._opt_reply(opt, Rep.ERR_INVALID, b"malformed meta context request")
            return
        image = self._server._exports.get(name) or self._default_export(name.encode())
        if image is None:
            self._opt_reply(opt, Rep.ERR_UNKNOWN, f"no export named {name!r}".encode())
            return
        if opt == Opt.LIST_META_CONTEXT:
            matched = not queries or any(q in ("base:", BASE_ALLOCATION) for q in queries)
        else:
            matched = BASE_ALLOCATION in queries
            self._meta_export = image.export.name if matched else None
        if matched:
            self._opt_reply(opt, Rep.META_CONTEXT, _U32.pack(BASE_ALLOCATION_ID) + BASE_ALLOCATION.encode())
        self._opt_reply(opt, Rep.ACK)

    def _enter_transmission(self, image: _Image) -> None:
        self._image = image
        self._block = image.export.min_block_size
        self._state = _S_TRANSMISSION

    # transmission

    def _simple(self, cookie: int, error: int) -> None:
        self._out += SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, error, cookie)

    def _error(self, cookie: int, error: int, cmd: int, message: str = "") -> None:
        if self._structured and cmd in (_READ, _BLOCK_STATUS):
            raw = message.encode()
            self._out += STRUCTURED_REPLY.pack(
                STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE, ReplyType.ERROR, cookie, 6 + len(raw)
            )
            self._out += _U32.pack(error) + _U16.pack(len(raw)) + raw
        else:
            self._simple(cookie, error)

    def _reply_error_later(self, cookie: int, error: int, cmd: int) -> Callable[[], None]:
        return lambda: self._error(cookie, error, cmd, "request larger than the maximum block size")

    def _check(self, cmd: int, flags: int, offset: int, length: int, image: _Image) -> int:
        """0 if the request is valid, else the NBD error to answer it with."""
        if flags & ~_ALLOWED_FLAGS[cmd]:
            return _EINVAL
        if cmd == _FLUSH:
            return 0
        if length == 0 or (offset | length) % self._block:
            return _EINVAL
        if cmd in (_READ, _WRITE) and length > MAX_BLOCK_SIZE:
            return _EINVAL
        if offset + length > image.size:
            return _EINVAL if cmd in (_READ, _BLOCK_STATUS) else _ENOSPC
        if image.export.read_only and cmd in (_WRITE, _TRIM, _WRITE_ZEROES):
            return _EPERM
        return 0

    def _do_write(self, flags: int, cookie: int, offset: int, data: memoryview) -> None:
        image = self._image
        assert image is not None
        err = self._check(_WRITE, flags, offset, len(data), image)
        if not err:
            err = self._apply(image, lambda: image.write(offset, data), flags & _FUA)
        self._simple(cookie, err)

    def _apply(self, image: _Image, action: Callable[[], None], fua: int) -> int:
        try:
            action()
            if fua:
                image.flush()
        except OSError as exc:
            log.error("nbd: export %s: %s", image.export.name, exc)
            return _to_nbd_errno(exc)
        except Exception:
            # A sink that fails has lost a captured write: the client must hear about it.
            log.exception("nbd: export %s: capture failed", image.export.name)
            return _EIO
        return 0

    def _command(self, cmd: int, flags: int, cookie: int, offset: int, length: int) -> None:
        image = self._image
        assert image is not None
        if cmd == _DISC:
            self._send_out()
            self.close()
            return
        if cmd not in _ALLOWED_FLAGS:
            self._error(cookie, _EINVAL, cmd, f"command {cmd} is not supported")
            return
        err = self._check(cmd, flags, offset, length, image)
        if err:
            self._error(cookie, err, cmd, "request out of range, misaligned or with a bad flag")
        elif cmd == _READ:
            self._read(cookie, offset, length, image)
        elif cmd == _FLUSH:
            self._simple(cookie, self._apply(image, image.flush, 0))
        elif cmd == _TRIM:
            self._simple(
                cookie, self._apply(image, lambda: image.zero(offset, length, punch=True), flags & _FUA)
            )
        elif cmd == _WRITE_ZEROES:
            punch = not flags & _NO_HOLE
            self._simple(
                cookie, self._apply(image, lambda: image.zero(offset, length, punch=punch), flags & _FUA)
            )
        else:
            self._block_status(cookie, flags, offset, length, image)

    def _read(self, cookie: int, offset: int, length: int, image: _Image) -> None:
        header = 28 if self._structured else 16
        if len(self._rbuf) < header + length:
            self._rbuf = bytearray(header + max(length, PREFERRED_BLOCK_SIZE))
        rview = memoryview(self._rbuf)
        try:
            image.read_into(rview[header : header + length], offset)
        except OSError as exc:
            rview.release()
            self._error(cookie, _to_nbd_errno(exc), _READ, exc.strerror or "read failed")
            return
        if self._structured:
            _OFFSET_DATA_HEADER.pack_into(
                self._rbuf,
                0,
                STRUCTURED_REPLY_MAGIC,
                REPLY_FLAG_DONE,
                ReplyType.OFFSET_DATA,
                cookie,
                8 + length,
                offset,
            )
        else:
            SIMPLE_REPLY.pack_into(self._rbuf, 0, SIMPLE_REPLY_MAGIC, 0, cookie)
        self._send_out()
        assert self._transport is not None
        self._transport.write(rview[: header + length])
        rview.release()
        if self._transport.get_write_buffer_size():
            # The transport kept what the socket did not take; it must not see our next read.
            self._rbuf = bytearray(len(self._rbuf))

    def _block_status(self, cookie: int, flags: int, offset: int, length: int, image: _Image) -> None:
        if not self._structured or self._meta_export != image.export.name:
            self._error(cookie, _EINVAL, _BLOCK_STATUS, "negotiate base:allocation first")
            return
        try:
            extents = image.extents(offset, length, 1 if flags & _REQ_ONE else MAX_EXTENTS)
        except OSError as exc:
            self._error(cookie, _to_nbd_errno(exc), _BLOCK_STATUS, exc.strerror or "seek failed")
            return
        self._out += STRUCTURED_REPLY.pack(
            STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE, ReplyType.BLOCK_STATUS, cookie, 4 + 8 * len(extents)
        )
        self._out += _U32.pack(BASE_ALLOCATION_ID)
        for ext_len, ext_flags in extents:
            self._out += _EXTENT.pack(ext_len, ext_flags)


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
            raise _refused(
                "nbd-export-invalid",
                f"Export names {names!r} are empty or repeated.",
                "Give every served disk its own name.",
            )
        if tcp is None and unix is None:
            raise _refused(
                "nbd-listener-missing",
                "The NBD server was given neither a TCP address nor a Unix socket.",
                "Pass tcp=(host, port) and/or unix=path.",
            )
        self._export_list = tuple(exports)
        self._tcp = tcp
        self._unix = Path(unix) if unix is not None else None
        self._exports: dict[str, _Image] = {}
        self._connections: set[_Connection] = set()
        self._servers: list[asyncio.Server] = []

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
                self._exports[export.name] = _Image(export)
            if self._tcp is not None:
                host, port = self._tcp
                self._servers.append(await loop.create_server(lambda: _Connection(self), host, port))
            if self._unix is not None:
                if self._unix.is_socket():
                    self._unix.unlink()
                self._servers.append(
                    await loop.create_unix_server(lambda: _Connection(self), str(self._unix))
                )
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
