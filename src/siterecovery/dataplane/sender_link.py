"""The messages between the agent and a pair's sender child (`sender_process.py`).

They travel pickled over a Unix socket pair (`multiprocessing.connection.Connection`): both ends
are the same installation, started by the agent itself. The child reports acknowledgements and
progress one way, and *calls* the agent for everything that changes the pair's state (sequence
numbers are allocated only by the agent, which owns the spool and `state.json`); every reply
carries the pair's state as the agent sees it after the call.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from siterecovery.config import LogFormat, LogLevel
from siterecovery.dataplane.assignments import DiskReplication
from siterecovery.dataplane.replica import SyncKind


@dataclass(frozen=True)
class Start:
    """The agent's first message: which pair to send and as whom."""

    spec: DiskReplication
    image: Path
    pair_dir: Path  # the pair's state directory: spool, its shared tail, sync bitmaps
    size: int
    component: str
    cert: Path
    key: Path
    ca: Path
    bytes_sent: int  # carried on across restarts of the child
    log_level: LogLevel  # the agent's own logging settings
    log_format: LogFormat


@dataclass(frozen=True)
class Stop:
    """Stop sending and exit (the agent stops, or the pair's sender is replaced)."""


class Op(StrEnum):
    STATE = "state"  # nothing to change: the state (at each session start and on a change)
    REFETCH = "refetch"  # args: offset, length -> the new write's sequence
    RESYNC_WHOLE = "resync-whole"
    REPAIR_SPOOL = "repair-spool"
    START_DIRTY = "start-dirty"  # a sync of the blocks tracked in dirty mode
    SYNC_GENERATED = "sync-generated"  # args: the sync's last sequence (-1: none)


@dataclass(frozen=True)
class Call:
    op: Op
    args: tuple[int, ...] = ()


@dataclass(frozen=True)
class PairView:
    """The pair's state the sender acts on."""

    sync: tuple[SyncKind, int] | None  # kind and s0 of the pending sync
    dirty_mode: bool
    lost: tuple[int, ...]
    revoked: frozenset[str]  # process-server certificate serials to refuse


@dataclass(frozen=True)
class Reply:
    view: PairView
    result: int | None = None


@dataclass(frozen=True)
class Acked:
    """The process server acknowledged everything up to `seq`: the agent frees the spool.

    It carries the byte counters too, so the agent never reports an acknowledgement beside a
    count of bytes sent from before it.
    """

    seq: int
    bytes_sent: int
    bytes_done: int
    bytes_total: int


@dataclass(frozen=True)
class Progress:
    bytes_sent: int
    bytes_done: int
    bytes_total: int
    last_error: str | None
