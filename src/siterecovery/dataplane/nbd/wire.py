"""The NBD protocol's numbers and message layouts, shared by the export's server and its client.

Magic numbers, option and reply codes, transmission flags and commands as enums, the `struct`
layouts of every fixed-size message, and the plain-int copies of the values the per-request path
compares against. Nothing here does I/O.
"""

from __future__ import annotations

import errno
import struct
from enum import IntEnum, IntFlag

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
U16 = struct.Struct(">H")
U32 = struct.Struct(">I")
U64 = struct.Struct(">Q")
EXTENT = struct.Struct(">II")
INFO_EXPORT = struct.Struct(">HQH")
INFO_BLOCK_SIZE = struct.Struct(">HIII")
OFFSET_DATA_HEADER = struct.Struct(">IHHQIQ")

TX_FLAGS_RW = (
    TxFlag.HAS_FLAGS
    | TxFlag.SEND_FLUSH
    | TxFlag.SEND_FUA
    | TxFlag.SEND_TRIM
    | TxFlag.SEND_WRITE_ZEROES
    # Correct because every connection to an export shares one file descriptor and one sink, and
    # a FLUSH syncs both: it makes durable every write completed on any connection.
    | TxFlag.CAN_MULTI_CONN
)
TX_FLAGS_RO = TxFlag.HAS_FLAGS | TxFlag.READ_ONLY | TxFlag.SEND_FLUSH | TxFlag.CAN_MULTI_CONN

# Plain ints for the per-request path: comparing against enum members costs an attribute lookup.
C_READ, C_WRITE, C_DISC, C_FLUSH = int(Cmd.READ), int(Cmd.WRITE), int(Cmd.DISC), int(Cmd.FLUSH)
C_TRIM, C_WRITE_ZEROES, C_BLOCK_STATUS = int(Cmd.TRIM), int(Cmd.WRITE_ZEROES), int(Cmd.BLOCK_STATUS)
F_FUA, F_NO_HOLE, F_REQ_ONE = int(CmdFlag.FUA), int(CmdFlag.NO_HOLE), int(CmdFlag.REQ_ONE)
ALLOWED_FLAGS = {
    C_READ: 0,
    C_WRITE: F_FUA,
    C_FLUSH: 0,
    C_TRIM: F_FUA,
    C_WRITE_ZEROES: F_FUA | F_NO_HOLE,
    C_BLOCK_STATUS: F_REQ_ONE,
}
MODIFYING = (C_WRITE, C_TRIM, C_WRITE_ZEROES)
E_IO, E_INVAL, E_NOSPC, E_PERM = int(NbdErrno.EIO), int(NbdErrno.EINVAL), int(NbdErrno.ENOSPC), 1


def to_nbd_errno(exc: OSError) -> int:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return E_NOSPC
    if exc.errno in (errno.EPERM, errno.EACCES, errno.EROFS):
        return E_PERM
    return E_IO


class ProtocolViolation(Exception):
    """The byte stream cannot be parsed any more; the connection must end."""
