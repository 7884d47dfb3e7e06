"""The seam between the agent's NBD export and replication.

The export applies every write to the local image first and then hands it to a `CaptureSink`, one
call per write, in exactly the order the writes reached the image: one disk is one ordered stream,
whatever number of NBD connections and requests in flight produced it. The sink (the replication
spool) assigns each write a per-disk sequence number. All calls for one export come from the
server's event-loop thread, one at a time, so a sink needs no locking; a slow sink slows the
export, which is the backpressure we want rather than unbounded buffering. A `SettlingSink` may
hold the writes of one batch (the requests the export read in one go) back and write them out
together when the export calls `settle` (the agent's spool: one system call per batch).

A `LoadAwareSink` also hears how busy the export is (`export_load`, a few times a second while
requests arrive): the agent's spool tells its sender to hold back while the export is saturated.

A `WriteIntent` (the agent's activity log) closes the window between the image and the sink: the
export marks a write's region in it, durably, before the image is touched, and tells it when the
write was recorded and when the sink made it durable.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Protocol, runtime_checkable


class CaptureSink(Protocol):
    """Receives the writes of one disk, in image order."""

    def record_write(self, offset: int, data: memoryview) -> int:
        """Record that `data` was written at `offset`; return its sequence number.

        `data` is a view of the connection's receive buffer and is only valid during the call: the
        sink must copy it or write it out before returning.
        """

    def record_zero(self, offset: int, length: int) -> int:
        """Record that `length` bytes at `offset` now read as zeroes (trim, write-zeroes, a zero
        write); return its sequence number."""

    def flush(self) -> None:
        """Make everything recorded so far durable; called for NBD FLUSH and FUA requests before
        the client is answered."""


@runtime_checkable
class SettlingSink(CaptureSink, Protocol):
    """A sink that may hold recorded writes back to write them out together (the agent's spool)."""

    def settle(self) -> None:
        """The export has handed over every request it had read: write out what was held back.

        Called before the export sends the replies of those requests; FLUSH and FUA reach `flush`,
        which settles first."""


@runtime_checkable
class BatchSink(CaptureSink, Protocol):
    """A sink that takes the writes of one batch in one call (the agent's capture switch)."""

    def record_writes(self, writes: Sequence[tuple[int, memoryview]]) -> None:
        """Record `(offset, data)` writes in this order, as `record_write` would one by one (the
        views are valid only during the call). A sink may check its limits once per call."""


@runtime_checkable
class LoadAwareSink(CaptureSink, Protocol):
    """A sink told how busy its export is (the agent's capture switch)."""

    def export_load(self, busy: float, now: float) -> None:
        """The share (0..1) of the wall time up to `now` (`time.monotonic()`) of the last window
        that the export's thread spent on requests."""


class WriteIntent(Protocol):
    """Where writes are about to go, recorded durably before they reach the image."""

    def covers(self, offset: int, length: int) -> bool:
        """The range is marked already: nothing to write before the image."""

    def mark(self, ranges: Iterable[tuple[int, int]], flush: Callable[[], None]) -> None:
        """Durably mark `ranges` (the export passes all its queued requests' ranges at once);
        `flush` makes the sink durable if room must be made."""

    def recorded(self, offset: int, length: int) -> None:
        """The write at `offset` was handed to the sink."""

    def recorded_writes(self, writes: Sequence[tuple[int, memoryview]]) -> None:
        """`recorded` for each `(offset, data)` write, in order."""

    def checkpoint(self) -> int:
        """A token taken before the sink is flushed ..."""

    def flushed(self, checkpoint: int) -> None:
        """... and given back once the flush returned: those writes are durable in the sink."""

    def close(self) -> None:
        """The export stops after a flush: a clean stop."""
