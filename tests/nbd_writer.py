"""An independent NBD writer for durability tests: a stdlib client writing self-verifying records.

Deliberately not the project's code (no import from `siterecovery`): it speaks the fixed-newstyle
handshake (NBD_OPT_GO) and simple replies itself, the way any guest's NBD client would. The
`RecordWriter` thread writes 4 KiB records into consecutive slots of a region, sends a FLUSH every
`flush_every` records and counts a record as *flushed* only once a FLUSH after it was answered.
When the export goes away (its server was killed), it reconnects until the socket accepts again and
rewrites every record after the last answered FLUSH (only those were promised). `verify_records`
then checks an image: every flushed slot must hold its own valid record.
"""

from __future__ import annotations

import contextlib
import hashlib
import socket
import struct
import threading
import time
from dataclasses import dataclass
from pathlib import Path

RECORD = 4096
_MAGIC = b"SRREC001"
_NBDMAGIC = 0x4E42444D41474943
_IHAVEOPT = 0x49484156454F5054
_OPT_REPLY_MAGIC = 0x3E889045565A9
_REQUEST_MAGIC = 0x25609513
_SIMPLE_REPLY_MAGIC = 0x67446698
_OPT_GO = 7
_REP_ACK = 1
_REP_INFO = 3
_CMD_WRITE, _CMD_DISC, _CMD_FLUSH = 1, 2, 3


class NbdError(OSError):
    """The server answered a request with an error, or the handshake failed."""


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("NBD server closed the connection")
        buf += chunk
    return bytes(buf)


class NbdConnection:
    """One connection to an export over a Unix socket: WRITE and FLUSH, one request at a time."""

    def __init__(self, path: Path, export: str, timeout: float = 60.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self._cookie = 0
        try:
            self.sock.connect(str(path))
            self.size = self._handshake(export)
        except BaseException:
            self.sock.close()
            raise

    def _handshake(self, export: str) -> int:
        magic, opt_magic, _flags = struct.unpack(">QQH", _recv_exact(self.sock, 18))
        if magic != _NBDMAGIC or opt_magic != _IHAVEOPT:
            raise NbdError("not a fixed-newstyle NBD server")
        self.sock.sendall(struct.pack(">I", 1 | 2))  # FIXED_NEWSTYLE | NO_ZEROES
        name = export.encode()
        data = struct.pack(">I", len(name)) + name + struct.pack(">H", 0)
        self.sock.sendall(struct.pack(">QII", _IHAVEOPT, _OPT_GO, len(data)) + data)
        size = -1
        while True:
            rmagic, _opt, rtype, rlen = struct.unpack(">QIII", _recv_exact(self.sock, 20))
            if rmagic != _OPT_REPLY_MAGIC:
                raise NbdError("bad option reply magic")
            payload = _recv_exact(self.sock, rlen)
            if rtype == _REP_ACK:
                break
            if rtype == _REP_INFO and len(payload) >= 12 and struct.unpack(">H", payload[:2])[0] == 0:
                size = struct.unpack(">Q", payload[2:10])[0]
            elif rtype & 0x80000000:
                raise NbdError(f"export {export!r} refused: reply {rtype:#x} {payload!r}")
        return size

    def _request(self, cmd: int, offset: int, data: bytes = b"", length: int = 0) -> None:
        self._cookie += 1
        header = struct.pack(
            ">IHHQQI", _REQUEST_MAGIC, 0, cmd, self._cookie, offset, len(data) if data else length
        )
        self.sock.sendall(header + data)
        magic, error, cookie = struct.unpack(">IIQ", _recv_exact(self.sock, 16))
        if magic != _SIMPLE_REPLY_MAGIC or cookie != self._cookie:
            raise NbdError("bad reply")
        if error:
            raise NbdError(f"NBD error {error} for command {cmd} at {offset}")

    def write(self, offset: int, data: bytes) -> None:
        self._request(_CMD_WRITE, offset, data)

    def flush(self) -> None:
        self._request(_CMD_FLUSH, 0)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.sendall(struct.pack(">IHHQQI", _REQUEST_MAGIC, 0, _CMD_DISC, 0, 0, 0))
        self.sock.close()


def record(slot: int, seed: int) -> bytes:
    """The self-verifying record of `slot`: magic, slot, seed, filler, then a SHA-256 of the rest."""
    head = _MAGIC + struct.pack(">QQ", slot, seed)
    filler = hashlib.shake_256(head).digest(RECORD - len(head) - 32)
    body = head + filler
    return body + hashlib.sha256(body).digest()


@dataclass
class Verdict:
    valid: int  # flushed slots holding their own valid record
    first_bad: int | None  # the first flushed slot that does not
    why: str = ""


def verify_records(image: Path, base: int, flushed: int, seed: int) -> Verdict:
    """Check slots 0..flushed-1 of the region at `base` of `image`."""
    valid = 0
    with open(image, "rb") as f:
        for slot in range(flushed):
            f.seek(base + slot * RECORD)
            got = f.read(RECORD)
            if got != record(slot, seed):
                empty = got == bytes(len(got))
                return Verdict(valid, slot, "empty" if empty else "corrupt or from another slot")
            valid += 1
    return Verdict(valid, None)


class RecordWriter:
    """Writes records into slots from 0 on, with a FLUSH every `flush_every`, reconnecting as needed."""

    def __init__(
        self, sock: Path, export: str, base: int, slots: int, seed: int = 1, flush_every: int = 16
    ) -> None:
        self.sock, self.export, self.base, self.slots = sock, export, base, slots
        self.seed, self.flush_every = seed, flush_every
        self.written = 0  # slots answered
        self.flushed = 0  # slots covered by an answered FLUSH
        self.reconnects = 0
        self.error: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="record-writer", daemon=True)

    def start(self) -> RecordWriter:
        self._thread.start()
        return self

    def wait_flushed(self, count: int, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while self.flushed < count:
            if self.error is not None:
                raise AssertionError(f"writer failed: {self.error}")
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise AssertionError(f"writer flushed {self.flushed} records, wanted {count}")
            time.sleep(0.05)

    def stop(self) -> None:
        """Stop after a last FLUSH of what was written (so every written record is flushed)."""
        self._stop.set()
        self._thread.join(timeout=120)

    def _connect(self) -> NbdConnection:
        deadline = time.monotonic() + 120
        while True:
            try:
                return NbdConnection(self.sock, self.export)
            except (ConnectionError, FileNotFoundError, OSError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def _run(self) -> None:
        conn: NbdConnection | None = None
        try:
            while True:
                try:
                    if conn is None:
                        conn = self._connect()
                    if self._stop.is_set() or self.written >= self.slots:
                        conn.flush()
                        self.flushed = self.written
                        conn.close()
                        return
                    slot = self.written
                    conn.write(self.base + slot * RECORD, record(slot, self.seed))
                    self.written = slot + 1
                    if self.written % self.flush_every == 0:
                        conn.flush()
                        self.flushed = self.written
                except (ConnectionError, TimeoutError, BrokenPipeError) as exc:
                    # The export went away. Only flushed writes are promised to survive that, so
                    # everything after the last answered FLUSH is written again after reconnecting.
                    self.written = self.flushed
                    if conn is not None:
                        conn.sock.close()
                    conn = None
                    self.reconnects += 1
                    if self.reconnects > 1000:
                        raise NbdError("too many reconnects") from exc
        except Exception as exc:  # the test reads it
            self.error = f"{type(exc).__name__}: {exc}"
