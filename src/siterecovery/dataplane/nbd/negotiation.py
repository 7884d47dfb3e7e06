"""The NBD handshake's options: what one client negotiates before it may send requests.

LIST, INFO, GO, EXPORT_NAME, ABORT, STRUCTURED_REPLY and LIST/SET_META_CONTEXT `base:allocation`
are answered here; the replies go out through the connection's output buffer. The option that picks
an export (GO, EXPORT_NAME) hands its image back to the connection, which then enters transmission
with what was negotiated (structured replies, the meta context).
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from enum import Enum

from siterecovery.dataplane.nbd.image import ExportImage
from siterecovery.dataplane.nbd.wire import (
    BASE_ALLOCATION,
    BASE_ALLOCATION_ID,
    INFO_BLOCK_SIZE,
    INFO_EXPORT,
    MAX_BLOCK_SIZE,
    OPT_REPLY,
    OPT_REPLY_MAGIC,
    PREFERRED_BLOCK_SIZE,
    TX_FLAGS_RO,
    TX_FLAGS_RW,
    U16,
    U32,
    U64,
    Info,
    Opt,
    ProtocolViolation,
    Rep,
)


class Ended(Enum):
    """The client ended the negotiation (NBD_OPT_ABORT): send the replies, then hang up."""

    ABORT = "abort"


def tx_flags(image: ExportImage) -> int:
    return int(TX_FLAGS_RO if image.export.read_only else TX_FLAGS_RW)


class Negotiation:
    """The options of one connection: what the client asked for so far, and the replies it is owed."""

    def __init__(self, exports: dict[str, ExportImage], emit: Callable[[bytes], None]) -> None:
        self._exports = exports
        self._emit = emit
        self.no_zeroes = False
        self.structured = False
        self.meta_export: str | None = None

    def reply(self, opt: int, rep: int, data: bytes = b"") -> None:
        self._emit(OPT_REPLY.pack(OPT_REPLY_MAGIC, opt, rep, len(data)) + data)

    def option(self, opt: int, data: bytes) -> ExportImage | Ended | None:
        """Answer one option: the image to serve once the client picked one, `Ended.ABORT` if it gave up."""
        exports = self._exports
        if opt == Opt.EXPORT_NAME:
            image = exports.get(data.decode("utf-8", "replace")) or self._default_export(data)
            if image is None:
                # This old option has no way to say "no such export" but hanging up.
                raise ProtocolViolation(f"unknown export {data!r} in NBD_OPT_EXPORT_NAME")
            self._emit(U64.pack(image.size) + U16.pack(tx_flags(image)))
            if not self.no_zeroes:
                self._emit(bytes(124))
            return image
        elif opt == Opt.ABORT:
            self.reply(opt, Rep.ACK)
            return Ended.ABORT
        elif opt == Opt.LIST:
            if data:
                self.reply(opt, Rep.ERR_INVALID, b"NBD_OPT_LIST takes no data")
                return None
            for name in exports:
                raw = name.encode()
                self.reply(opt, Rep.SERVER, U32.pack(len(raw)) + raw)
            self.reply(opt, Rep.ACK)
        elif opt in (Opt.INFO, Opt.GO):
            return self._info_or_go(opt, data)
        elif opt == Opt.STRUCTURED_REPLY:
            if data:
                self.reply(opt, Rep.ERR_INVALID, b"NBD_OPT_STRUCTURED_REPLY takes no data")
                return None
            self.structured = True
            self.reply(opt, Rep.ACK)
        elif opt in (Opt.LIST_META_CONTEXT, Opt.SET_META_CONTEXT):
            self._meta_context(opt, data)
        else:
            self.reply(opt, Rep.ERR_UNSUP, f"option {opt} is not supported".encode())
        return None

    def _default_export(self, raw_name: bytes) -> ExportImage | None:
        # The empty name is the protocol's "default export": ours is the first one configured.
        if raw_name:
            return None
        return next(iter(self._exports.values()), None)

    def _info_or_go(self, opt: int, data: bytes) -> ExportImage | None:
        if len(data) < 6:
            self.reply(opt, Rep.ERR_INVALID, b"option data too short")
            return None
        (name_len,) = U32.unpack_from(data, 0)
        if 4 + name_len + 2 > len(data):
            self.reply(opt, Rep.ERR_INVALID, b"export name length exceeds the option data")
            return None
        raw = data[4 : 4 + name_len]
        (n_info,) = U16.unpack_from(data, 4 + name_len)
        if 6 + name_len + 2 * n_info != len(data):
            self.reply(opt, Rep.ERR_INVALID, b"information request count does not match the data")
            return None
        wanted = {U16.unpack_from(data, 6 + name_len + 2 * i)[0] for i in range(n_info)}
        name = raw.decode("utf-8", "replace")
        image = self._exports.get(name) or self._default_export(raw)
        if image is None:
            self.reply(opt, Rep.ERR_UNKNOWN, f"no export named {name!r}".encode())
            return None
        self.reply(opt, Rep.INFO, INFO_EXPORT.pack(Info.EXPORT, image.size, tx_flags(image)))
        if Info.NAME in wanted:
            real = image.export.name.encode()
            self.reply(opt, Rep.INFO, U16.pack(Info.NAME) + real)
        # Sent whether asked or not: a client that ignores it still gets errors, not corruption.
        self.reply(
            opt,
            Rep.INFO,
            INFO_BLOCK_SIZE.pack(
                Info.BLOCK_SIZE, image.export.min_block_size, PREFERRED_BLOCK_SIZE, MAX_BLOCK_SIZE
            ),
        )
        self.reply(opt, Rep.ACK)
        if opt == Opt.GO:
            if self.meta_export is not None and self.meta_export != image.export.name:
                self.meta_export = None
            return image
        return None

    def _meta_context(self, opt: int, data: bytes) -> None:
        if not self.structured:
            self.reply(opt, Rep.ERR_INVALID, b"negotiate NBD_OPT_STRUCTURED_REPLY first")
            return
        try:
            (name_len,) = U32.unpack_from(data, 0)
            name = data[4 : 4 + name_len].decode("utf-8", "replace")
            (n_queries,) = U32.unpack_from(data, 4 + name_len)
            pos = 8 + name_len
            queries = []
            for _ in range(n_queries):
                (qlen,) = U32.unpack_from(data, pos)
                if pos + 4 + qlen > len(data):
                    raise struct.error("query longer than the option data")
                queries.append(data[pos + 4 : pos + 4 + qlen].decode("utf-8", "replace"))
                pos += 4 + qlen
            if pos != len(data):
                raise struct.error("trailing bytes after the queries")
        except struct.error:
            self.reply(opt, Rep.ERR_INVALID, b"malformed meta context request")
            return
        image = self._exports.get(name) or self._default_export(name.encode())
        if image is None:
            self.reply(opt, Rep.ERR_UNKNOWN, f"no export named {name!r}".encode())
            return
        if opt == Opt.LIST_META_CONTEXT:
            matched = not queries or any(q in ("base:", BASE_ALLOCATION) for q in queries)
        else:
            matched = BASE_ALLOCATION in queries
            self.meta_export = image.export.name if matched else None
        if matched:
            self.reply(opt, Rep.META_CONTEXT, U32.pack(BASE_ALLOCATION_ID) + BASE_ALLOCATION.encode())
        self.reply(opt, Rep.ACK)
