"""One NBD client of the export: framing, request parsing in place, and the replies.

Every connection is an asyncio `BufferedProtocol` that receives straight into one reusable buffer
and applies requests in the event-loop thread: writes of all connections to an export therefore
reach the image and the `CaptureSink` in one order without a lock, and a write's payload goes from
the socket to `pwrite` and the sink as a `memoryview` without a copy. Before transmission the bytes
are options, answered by the connection's `Negotiation`. A client's mistake (bad range, alignment,
flag, command) is answered with an NBD error; only a broken framing (bad magic) ends a connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import mmap
import struct
import time
from collections.abc import Callable

from siterecovery.dataplane.capture import WriteIntent
from siterecovery.dataplane.nbd.image import ExportImage
from siterecovery.dataplane.nbd.negotiation import Ended, Negotiation
from siterecovery.dataplane.nbd.wire import (
    ALLOWED_FLAGS,
    BASE_ALLOCATION_ID,
    C_BLOCK_STATUS,
    C_DISC,
    C_FLUSH,
    C_READ,
    C_TRIM,
    C_WRITE,
    C_WRITE_ZEROES,
    E_INVAL,
    E_IO,
    E_NOSPC,
    E_PERM,
    EXTENT,
    F_FUA,
    F_NO_HOLE,
    F_REQ_ONE,
    IHAVEOPT,
    MAX_BLOCK_SIZE,
    MAX_EXTENTS,
    MAX_OPTION_LENGTH,
    MODIFYING,
    NBDMAGIC,
    OFFSET_DATA_HEADER,
    OPT_HEADER,
    PREFERRED_BLOCK_SIZE,
    REPLY_FLAG_DONE,
    REQUEST,
    REQUEST_MAGIC,
    SIMPLE_REPLY,
    SIMPLE_REPLY_MAGIC,
    STRUCTURED_REPLY,
    STRUCTURED_REPLY_MAGIC,
    U16,
    U32,
    HandshakeFlag,
    ProtocolViolation,
    Rep,
    ReplyType,
    to_nbd_errno,
)

log = logging.getLogger(__name__)

_S_FLAGS, _S_OPTIONS, _S_TRANSMISSION, _S_CLOSED = range(4)


class Connection(asyncio.BufferedProtocol):
    """One client: the handshake, then requests parsed in place from one reusable buffer."""

    def __init__(self, exports: dict[str, ExportImage], connections: set[Connection]) -> None:
        self._connections = connections
        self._negotiation = Negotiation(exports, self._emit)
        self._transport: asyncio.Transport | None = None
        # One request header plus the largest payload always fits, so a message never straddles
        # the end of the buffer once the partial bytes before it are moved to the front. Anonymous
        # memory, not a bytearray: the kernel hands out zero pages as they are first touched,
        # where a bytearray would zero all 32 MiB up front (~50 ms per connection on the loaded
        # 2-core box, paid by every short-lived client).
        self._buf = mmap.mmap(-1, MAX_BLOCK_SIZE + 256 * 1024)
        self._view = memoryview(self._buf)
        self._start = 0
        self._end = 0
        self._state = _S_FLAGS
        self._discard = 0
        self._after_discard: Callable[[], None] | None = None
        self._structured = False
        self._meta_export: str | None = None
        self._image: ExportImage | None = None
        self._block = 1
        self._out = bytearray()
        self._rbuf = bytearray(32 + PREFERRED_BLOCK_SIZE)
        self._paused = False
        self._began = 0.0  # when the current receive started (`get_buffer`)

    # asyncio callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        self._connections.add(self)
        transport.write(
            struct.pack(">QQH", NBDMAGIC, IHAVEOPT, HandshakeFlag.FIXED_NEWSTYLE | HandshakeFlag.NO_ZEROES)
        )

    def connection_lost(self, exc: Exception | None) -> None:
        self._state = _S_CLOSED
        self._connections.discard(self)
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
        # The receive that follows is part of the stretch of work the export's meter counts.
        self._began = time.monotonic()
        if self._end == len(self._buf):
            self._compact()
        return self._view[self._end :]

    def buffer_updated(self, nbytes: int) -> None:
        self._end += nbytes
        meter = self._image.meter if self._image is not None else None
        if not nbytes:
            self._began = time.monotonic()  # taken up again after a pause: no receive before it
        try:
            self._consume()
        except ProtocolViolation as exc:
            log.warning("nbd: closing connection: %s", exc)
            self._settle()
            self._send_out()
            self.close()
            return
        self._settle()
        self._send_out()
        if meter is not None:
            meter.add(self._began, time.monotonic())

    def _settle(self) -> None:
        """Let the sink write out the writes of this batch together (one spool append)."""
        image = self._image
        if image is None or image.settle is None:
            return
        try:
            image.settle()
        except Exception:
            # Never acknowledge what may not be captured: drop the replies and the connection.
            log.exception("nbd: export %s: capture failed", image.export.name)
            self._out = bytearray()
            self.close()

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
                self._take_writes()
                avail = self._end - self._start
                if avail < 28:
                    break
                magic, flags, cmd, cookie, offset, length = REQUEST.unpack_from(buf, self._start)
                if magic != REQUEST_MAGIC:
                    raise ProtocolViolation(f"bad request magic {magic:#x}")
                intent = self._image.intent if self._image is not None else None
                if intent is not None and cmd in MODIFYING and not intent.covers(offset, length):
                    self._mark_queued(intent)
                before = self._image.before if self._image is not None else None
                if before is not None and cmd in MODIFYING and not before.covers(offset, length):
                    with contextlib.suppress(OSError):  # the request's own preserve reports it
                        before.preserve_all(self._queued_ranges())
                if cmd == C_WRITE:
                    if length > MAX_BLOCK_SIZE:
                        self._start += 28
                        self._discard = length
                        self._after_discard = self._reply_error_later(cookie, E_INVAL, C_WRITE)
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
                    raise ProtocolViolation(f"bad option magic {magic:#x}")
                if length > MAX_OPTION_LENGTH:
                    self._start += 16
                    self._discard = length
                    self._after_discard = lambda opt=opt: self._negotiation.reply(
                        opt, Rep.ERR_TOO_BIG, b"option data too long"
                    )
                    continue
                if avail < 16 + length:
                    self._need(16 + length)
                    break
                data = bytes(view[self._start + 16 : self._start + 16 + length])
                self._start += 16 + length
                outcome = self._negotiation.option(opt, data)
                if isinstance(outcome, ExportImage):
                    self._enter_transmission(outcome)
                elif outcome is Ended.ABORT:
                    self._send_out()
                    self.close()
            else:
                if avail < 4:
                    break
                (client_flags,) = U32.unpack_from(buf, self._start)
                self._start += 4
                if not client_flags & HandshakeFlag.FIXED_NEWSTYLE:
                    raise ProtocolViolation("client does not speak fixed newstyle")
                self._negotiation.no_zeroes = bool(client_flags & HandshakeFlag.NO_ZEROES)
                self._state = _S_OPTIONS
        if self._start == self._end:
            self._start = self._end = 0

    def _take_writes(self) -> None:
        """Apply the run of plain writes at the front of the buffer as one batch.

        A plain write is complete in the buffer, valid and without flags: it is answered with
        success unless the image or the sink fails. Anything else (a FUA write, another command,
        a bad request, an incomplete one) stops the run and takes the general path. The batch goes
        to the image and then to the sink in one call, in order, and is applied before anything
        could move the buffer's bytes (its payloads are views of the buffer).
        """
        image = self._image
        if image is None or image.export.read_only:
            return
        buf, view, end = self._buf, self._view, self._end
        pos = self._start
        size, block = image.size, self._block
        intent = image.intent
        before = image.before if image.before is not None and image.before.active else None
        unpack = REQUEST.unpack_from
        writes: list[tuple[int, memoryview]] = []
        cookies: list[int] = []
        while end - pos >= 28:
            magic, flags, cmd, cookie, offset, length = unpack(buf, pos)
            if (
                cmd != C_WRITE
                or flags
                or magic != REQUEST_MAGIC
                or not 0 < length <= MAX_BLOCK_SIZE
                or (offset | length) % block
                or offset + length > size
                or end - pos - 28 < length
            ):
                break
            if (intent is not None and not intent.covers(offset, length)) or (
                before is not None and not before.covers(offset, length)
            ):
                # Apply the writes taken so far first: marking may unmark extents whose recorded
                # writes are durable, and theirs are not recorded yet (as one by one).
                self._start = pos
                if writes:
                    self._apply_writes(image, writes, cookies)
                    writes, cookies = [], []
                if intent is not None and not intent.covers(offset, length):
                    self._mark_queued(intent)
                if before is not None and not before.covers(offset, length):
                    with contextlib.suppress(OSError):  # the write's own preserve reports it
                        before.preserve_all(self._queued_ranges())
            pos += 28
            writes.append((offset, view[pos : pos + length]))
            cookies.append(cookie)
            pos += length
        self._start = pos
        if writes:
            self._apply_writes(image, writes, cookies)

    def _apply_writes(
        self, image: ExportImage, writes: list[tuple[int, memoryview]], cookies: list[int]
    ) -> None:
        try:
            # Each write's range was found marked, or just marked, as it was taken into the batch,
            # and `_take_writes` applies the batch before it marks anything else: still marked.
            image.write_many(writes, marked=True)
        except Exception:
            # Which one failed is unknown: answer each write on its own. Writing a payload to the
            # image again is harmless, and so is recording a write again after itself, in order.
            for (offset, data), cookie in zip(writes, cookies, strict=True):
                self._simple(cookie, self._apply(image, functools.partial(image.write, offset, data), 0))
            return
        out, pack = self._out, SIMPLE_REPLY.pack
        for cookie in cookies:
            out += pack(SIMPLE_REPLY_MAGIC, 0, cookie)

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
            if cmd in MODIFYING and length and offset < image.size:
                ranges.append((offset, min(length, image.size - offset)))
            pos += 28 + (length if cmd == C_WRITE else 0)
        return ranges

    def _send_out(self) -> None:
        if self._out and self._transport is not None:
            # Hand the batch over rather than reuse it: a transport may keep a reference to it.
            out, self._out = self._out, bytearray()
            self._transport.write(out)

    def _emit(self, data: bytes) -> None:
        self._out += data

    def _enter_transmission(self, image: ExportImage) -> None:
        # Options are over: what was negotiated is copied where the per-request path reads it.
        self._structured = self._negotiation.structured
        self._meta_export = self._negotiation.meta_export
        self._image = image
        self._block = image.export.min_block_size
        self._state = _S_TRANSMISSION

    # transmission

    def _simple(self, cookie: int, error: int) -> None:
        self._out += SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, error, cookie)

    def _error(self, cookie: int, error: int, cmd: int, message: str = "") -> None:
        if self._structured and cmd in (C_READ, C_BLOCK_STATUS):
            raw = message.encode()
            self._out += STRUCTURED_REPLY.pack(
                STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE, ReplyType.ERROR, cookie, 6 + len(raw)
            )
            self._out += U32.pack(error) + U16.pack(len(raw)) + raw
        else:
            self._simple(cookie, error)

    def _reply_error_later(self, cookie: int, error: int, cmd: int) -> Callable[[], None]:
        return lambda: self._error(cookie, error, cmd, "request larger than the maximum block size")

    def _check(self, cmd: int, flags: int, offset: int, length: int, image: ExportImage) -> int:
        """0 if the request is valid, else the NBD error to answer it with."""
        if flags & ~ALLOWED_FLAGS[cmd]:
            return E_INVAL
        if cmd == C_FLUSH:
            return 0
        if length == 0 or (offset | length) % self._block:
            return E_INVAL
        if cmd in (C_READ, C_WRITE) and length > MAX_BLOCK_SIZE:
            return E_INVAL
        if offset + length > image.size:
            return E_INVAL if cmd in (C_READ, C_BLOCK_STATUS) else E_NOSPC
        if image.export.read_only and cmd in (C_WRITE, C_TRIM, C_WRITE_ZEROES):
            return E_PERM
        return 0

    def _do_write(self, flags: int, cookie: int, offset: int, data: memoryview) -> None:
        image = self._image
        assert image is not None
        err = self._check(C_WRITE, flags, offset, len(data), image)
        if not err:
            err = self._apply(image, lambda: image.write(offset, data), flags & F_FUA)
        self._simple(cookie, err)

    def _apply(self, image: ExportImage, action: Callable[[], None], fua: int) -> int:
        try:
            action()
            if fua:
                image.flush()
        except OSError as exc:
            log.error("nbd: export %s: %s", image.export.name, exc)
            return to_nbd_errno(exc)
        except Exception:
            # A sink that fails has lost a captured write: the client must hear about it.
            log.exception("nbd: export %s: capture failed", image.export.name)
            return E_IO
        return 0

    def _command(self, cmd: int, flags: int, cookie: int, offset: int, length: int) -> None:
        image = self._image
        assert image is not None
        if cmd == C_DISC:
            self._send_out()
            self.close()
            return
        if cmd not in ALLOWED_FLAGS:
            self._error(cookie, E_INVAL, cmd, f"command {cmd} is not supported")
            return
        err = self._check(cmd, flags, offset, length, image)
        if err:
            self._error(cookie, err, cmd, "request out of range, misaligned or with a bad flag")
        elif cmd == C_READ:
            self._read(cookie, offset, length, image)
        elif cmd == C_FLUSH:
            self._simple(cookie, self._apply(image, image.flush, 0))
        elif cmd == C_TRIM:
            self._simple(
                cookie, self._apply(image, lambda: image.zero(offset, length, punch=True), flags & F_FUA)
            )
        elif cmd == C_WRITE_ZEROES:
            punch = not flags & F_NO_HOLE
            self._simple(
                cookie, self._apply(image, lambda: image.zero(offset, length, punch=punch), flags & F_FUA)
            )
        else:
            self._block_status(cookie, flags, offset, length, image)

    def _read(self, cookie: int, offset: int, length: int, image: ExportImage) -> None:
        header = 28 if self._structured else 16
        if len(self._rbuf) < header + length:
            self._rbuf = bytearray(header + max(length, PREFERRED_BLOCK_SIZE))
        rview = memoryview(self._rbuf)
        try:
            image.read_into(rview[header : header + length], offset)
        except OSError as exc:
            rview.release()
            self._error(cookie, to_nbd_errno(exc), C_READ, exc.strerror or "read failed")
            return
        if self._structured:
            OFFSET_DATA_HEADER.pack_into(
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

    def _block_status(self, cookie: int, flags: int, offset: int, length: int, image: ExportImage) -> None:
        if not self._structured or self._meta_export != image.export.name:
            self._error(cookie, E_INVAL, C_BLOCK_STATUS, "negotiate base:allocation first")
            return
        try:
            extents = image.extents(offset, length, 1 if flags & F_REQ_ONE else MAX_EXTENTS)
        except OSError as exc:
            self._error(cookie, to_nbd_errno(exc), C_BLOCK_STATUS, exc.strerror or "seek failed")
            return
        self._out += STRUCTURED_REPLY.pack(
            STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE, ReplyType.BLOCK_STATUS, cookie, 4 + 8 * len(extents)
        )
        self._out += U32.pack(BASE_ALLOCATION_ID)
        for ext_len, ext_flags in extents:
            self._out += EXTENT.pack(ext_len, ext_flags)
