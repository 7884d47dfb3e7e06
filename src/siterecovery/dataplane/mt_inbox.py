"""The master target's receive thread: a session's frames read ahead of applying them (issue 16).

A session's thread used to read a frame, apply it and — every `ACK_EVERY_BYTES` or when the
stream paused — sync the pair (the journal's undo records fsynced, the replica written and
fdatasynced, a commit record fsynced) and acknowledge, reading nothing meanwhile: py-spy on a full
sync showed the session thread a third of its time in the replica's device writes while the
process server's frames waited in the socket. Now `Receiver` reads, verifies and copies each frame
into a buffer of its own on a second thread and queues it in an `Inbox` bounded in bytes; the
session's thread takes frames from the inbox and applies, syncs and acknowledges them exactly as
before, in order. Durability does not change: a queued frame is not applied, let alone
acknowledged, so a crash loses only frames the process server still holds; the write-ahead
sequence of each sync runs on one thread as before (`journal/log.py`).

The group commit's "stream paused" test is now an empty inbox (`Inbox.quiet_for`) rather than an
unreadable socket: the applying thread, keeping up, finds the inbox empty between frames more often
than it found the socket empty, so a fast stream is synced and acknowledged a little more often
(41-47 syncs per GiB instead of 32 in a 1 GiB blast at the master target alone; still at most one
per `ACK_MIN_SECONDS` unless `ACK_EVERY_BYTES` came first).

Errors the receive thread meets (a corrupt frame, a broken connection) are queued in order behind
the frames read before them, so the session's thread answers them where it met them before.

The receive thread also computes the fine digests of whole 1 MiB blocks for pairs that keep them
(`target_digests.py`): pure work on bytes it holds, which leaves the applying thread mostly waiting
on the disk with the GIL free — the receive thread needs the GIL back for every 16 KiB TLS record,
and waited for it behind those hashes (an earlier read-ahead thread was dropped for that).
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass
from typing import Final

from siterecovery.dataplane.blocks import COARSE
from siterecovery.dataplane.direct_write import POOL
from siterecovery.dataplane.protocol import Frame, FrameReader, FrameType
from siterecovery.dataplane.target_digests import fine_digests

# Payload bytes read ahead of applying, per session (one more frame may be queued): enough to keep
# reading through one sync (at most `ACK_EVERY_BYTES` written and fdatasynced), and a bound on the
# memory a session takes beyond the journal's pending writes.
INBOX_BYTES = 32 << 20


class _End:
    """The stream ended cleanly between frames."""


END: Final = _End()


@dataclass(slots=True)
class Received:
    """A frame whose payload it owns; `fines`: the fine digests of a whole coarse block written
    to a pair that keeps digests, computed here rather than on the applying thread."""

    frame: Frame
    fines: bytes | None = None


Item = Received | BaseException | _End


class Inbox:
    """Frames (with payloads of their own), errors and the end, in arrival order; bounded in bytes."""

    def __init__(self, limit: int = INBOX_BYTES) -> None:
        self._limit = limit
        self._items: deque[tuple[Item, int]] = deque()
        self._bytes = 0
        self._cond = threading.Condition()
        self._closed = False

    @property
    def queued(self) -> int:
        """Items waiting (for tests and crash children)."""
        return len(self._items)

    def put(self, item: Item, nbytes: int = 0) -> bool:
        """Queue `item`, waiting while the inbox is full; False once it is closed."""
        with self._cond:
            # An item larger than the limit still goes in, alone: no frame waits forever.
            self._cond.wait_for(
                lambda: self._closed or not self._items or self._bytes + nbytes <= self._limit
            )
            if self._closed:
                return False
            self._items.append((item, nbytes))
            self._bytes += nbytes
            self._cond.notify_all()
            return True

    def get(self) -> Item:
        """The next item, waiting for one; END once the inbox is closed and empty."""
        with self._cond:
            self._cond.wait_for(lambda: self._closed or bool(self._items))
            if not self._items:
                return END
            item, nbytes = self._items.popleft()
            self._bytes -= nbytes
            self._cond.notify_all()
            return item

    def quiet_for(self, seconds: float) -> bool:
        """True when nothing is queued within `seconds` (0: now): the moment to sync and ACK."""
        with self._cond:
            if seconds > 0:
                self._cond.wait_for(lambda: self._closed or bool(self._items), timeout=seconds)
            return not self._items

    def close(self) -> None:
        """No more items: a waiting `put` returns False, a waiting `get` END."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()


class Receiver:
    """Reads a session's frames into an `Inbox` on a thread of its own until the stream ends,
    fails or the inbox is closed. Each payload lands in a buffer the frame owns, which the journal
    keeps instead of copying it again (`owned=True`): an uncompressed 1 MiB run is received
    straight into a page-aligned pooled buffer (`direct_write.POOL`); anything else is copied out
    of the reader's reused buffer."""

    def __init__(self, reader: FrameReader, inbox: Inbox, name: str, digested: frozenset[int]) -> None:
        self._reader = reader
        self._inbox = inbox
        self._digested = digested  # the session's pair indexes that keep block digests
        self._thread = threading.Thread(target=self._run, name=f"mt-recv-{name}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)

    def _run(self) -> None:
        inbox = self._inbox
        while True:
            try:
                frame = self._reader.read(into=_pooled)
            except Exception as exc:  # handed to the session's thread, in order
                inbox.put(exc)
                return
            if frame is None:
                inbox.put(END)
                return
            owned = frame.payload
            if not POOL.owns(owned):
                # In the reader's reused buffer (or a decompressor's output): copied out.
                n = len(frame.payload)
                owned = POOL.take() if n == POOL.size else memoryview(bytearray(n))
                owned[:] = frame.payload
            h = frame.header
            fines = None
            if (
                len(owned) == COARSE
                and not h.offset % COARSE
                and h.pair in self._digested
                and h.type in (FrameType.WRITE, FrameType.BLOCK)
            ):
                # The applying thread holds the GIL for these 256 hashes per MiB otherwise, while
                # this thread needs it back for every 16 KiB TLS record it reads.
                fines = fine_digests(owned)
            if not inbox.put(Received(Frame(h, owned, owned), fines), len(owned)):
                return


def _pooled(n: int) -> memoryview | None:
    """A pooled buffer for a 1 MiB payload, received straight into it (page-aligned: the journal
    writes it to the replica from there, `direct_write.py`); other sizes go through the reader."""
    return POOL.take() if n == POOL.size else None
