"""Each pair's sender runs in a child process of the agent, supervised by the agent.

Why a process: compressing and encrypting the stream took the GIL from the NBD export's event
loop in the same process, which then sat idle while the guest waited (issue 16). The export's
process now only captures: it appends to the durable spool and publishes the spool's tail in
shared memory (`spool_tail.py`, no system call per write). The child (`sender_child.py`, started
as `python -m siterecovery.dataplane.sender_child`) reads the spool files, compresses, encrypts
and sends them with the pair-scoped TLS identity, and reports acknowledgements back; it calls the
agent for every state change (`remote_pair.py`), so sequence numbers and `state.json` keep a
single owner.

`SenderProcess` starts the child, answers its calls on a thread of its own, and restarts it with
backoff when it dies. Nothing is lost when it does: the spool is the durable hand-off and is
freed only on the process server's acknowledgement, which the child forwards; the next child
resends everything after what the process server reports it holds. The child exits when the
agent tells it to, and by itself when the agent's end of the socket closes (the agent died).

A child's interpreter and imports cost ~0.3 CPU-s and 0.3-0.5 s before its first byte, most of
the time to first byte after protection is enabled (issue 16). So an agent started with
`SpareChild` starts one child ahead, at its own start, nice'd like every child: it imports and
then waits for its `Start`. The first sender to start takes it; it is not replaced (a second
spare would cost an idle interpreter's memory for as long as the agent runs, and starting it
would take CPU from the sync that just began), so later pairs and restarts start their own.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import subprocess
import sys
import threading
from multiprocessing.connection import Connection

from siterecovery.config import LogFormat, LogLevel
from siterecovery.dataplane.links import Identity
from siterecovery.dataplane.replica import PairReplication, SyncKind
from siterecovery.dataplane.sender_link import (
    Acked,
    Call,
    Op,
    PairView,
    Progress,
    Reply,
    Start,
    Stop,
)
from siterecovery.dataplane.trust import Revocations
from siterecovery.logs import PAIR_ID, JsonFormatter
from siterecovery.retry import Backoff

log = logging.getLogger(__name__)

PID_FILE = "sender.pid"  # in the pair's directory: the running child (for operators and tests)
STOP_TIMEOUT = 15.0
# The child runs at a lower CPU priority than the export: on a busy host the guest's writes get the
# CPU first and the spool absorbs the burst; the child sends it as soon as CPU is free (issue 16).
SENDER_NICE = 10


def _spawn() -> tuple[subprocess.Popen[bytes], Connection]:
    """A sender child, nice'd, and the agent's end of its socket (it waits for its `Start`)."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "siterecovery.dataplane.sender_child", str(theirs.fileno())],
            pass_fds=[theirs.fileno()],
        )
    except BaseException:
        ours.close()
        raise
    finally:
        theirs.close()
    with contextlib.suppress(OSError):  # the child may already be gone; it is restarted then
        os.setpriority(os.PRIO_PROCESS, proc.pid, os.getpriority(os.PRIO_PROCESS, 0) + SENDER_NICE)
    return proc, Connection(ours.detach())


class SpareChild:
    """One sender child started ahead, for the first sender to take (see the module's paragraphs)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._child: tuple[subprocess.Popen[bytes], Connection] | None = None
        self._closed = False

    def start(self) -> None:
        with self._lock:
            if self._child is None and not self._closed:
                self._child = _spawn()

    @property
    def pid(self) -> int | None:
        child = self._child
        return None if child is None else child[0].pid

    def take(self) -> tuple[subprocess.Popen[bytes], Connection] | None:
        """The spare, if one is alive (then there is none left), else None."""
        with self._lock:
            child, self._child = self._child, None
        if child is not None and child[0].poll() is not None:
            _end(*child)
            return None
        return child

    def close(self) -> None:
        """The agent stops: a spare never taken exits (its end of the socket closes)."""
        with self._lock:
            self._closed = True
            child, self._child = self._child, None
        if child is not None:
            _end(*child)


def _end(proc: subprocess.Popen[bytes], conn: Connection) -> None:
    conn.close()  # the child exits by itself when the agent's end closes
    try:
        proc.wait(timeout=STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


class SenderProcess:
    """Supervises one pair's sender child (same surface as the in-process sender had)."""

    def __init__(
        self,
        pair: PairReplication,
        identity: Identity,
        component: str,
        revoked: Revocations,
        spare: SpareChild | None = None,
    ) -> None:
        self.pair = pair
        self._spare = spare
        self._identity = identity
        self._component = component
        self._revoked = revoked
        self.stopped = threading.Event()
        self.last_error: str | None = None
        self.restarts = 0
        self._proc: subprocess.Popen[bytes] | None = None
        self._conn: Connection | None = None
        self._send_lock = threading.Lock()
        self._thread = threading.Thread(target=self._supervise, name=f"send-{pair.pair_id}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self.stopped.set()
        conn = self._conn
        if conn is not None:
            with contextlib.suppress(OSError), self._send_lock:
                conn.send(Stop())
        self._thread.join(timeout=STOP_TIMEOUT + 5)

    def _supervise(self) -> None:
        PAIR_ID.set(self.pair.pair_id)  # this thread's log lines name the pair
        backoff = Backoff(0.1, 5.0)  # jittered, like every reconnect
        while not self.stopped.is_set():
            try:
                code = self._run_child()
            except Exception:  # never a silent death: the pair would stop replicating for good
                log.exception("sender of %s failed", self.pair.pair_id)
                code = None
            if self.stopped.is_set():
                break
            self.restarts += 1
            delay = backoff.next()
            log.warning("sender of %s exited (code %s); restarting in %.1f s", self.pair.pair_id, code, delay)
            self.stopped.wait(delay)
        (self.pair.dir / PID_FILE).unlink(missing_ok=True)

    def _run_child(self) -> int | None:
        spare = self._spare.take() if self._spare is not None else None
        proc, conn = spare if spare is not None else _spawn()
        self._proc = proc
        (self.pair.dir / PID_FILE).write_text(f"{proc.pid}\n")
        self._conn = conn
        try:
            pair, identity = self.pair, self._identity
            with self._send_lock:
                conn.send(
                    Start(
                        pair.spec,
                        pair.image,
                        pair.dir,
                        pair.size,
                        self._component,
                        identity.cert,
                        identity.key,
                        identity.ca,
                        pair.bytes_sent,
                        *_log_settings(),
                    )
                )
            if self.stopped.is_set():
                with self._send_lock:
                    conn.send(Stop())
            self._serve(conn)
        except (OSError, EOFError) as exc:
            log.info("sender of %s: link to the child ended: %s", self.pair.pair_id, exc)
        finally:
            self._conn = None
            with self._send_lock:
                conn.close()
        try:
            return proc.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            return proc.wait()

    def _serve(self, conn: Connection) -> None:
        """Apply the child's reports and answer its calls until it exits."""
        pair = self.pair
        while True:
            msg = conn.recv()
            if isinstance(msg, Acked):
                pair.bytes_sent, pair.bytes_done = msg.bytes_sent, msg.bytes_done
                pair.bytes_total = msg.bytes_total
                pair.on_ack(msg.seq)
            elif isinstance(msg, Progress):
                pair.bytes_sent, pair.bytes_done = msg.bytes_sent, msg.bytes_done
                pair.bytes_total = msg.bytes_total
                self.last_error = msg.last_error
            elif isinstance(msg, Call):
                result = self._apply(msg)
                with self._send_lock:
                    conn.send(Reply(self._view(), result))
            else:
                raise OSError(f"unexpected message from the sender child: {type(msg).__name__}")

    def _apply(self, call: Call) -> int | None:
        pair = self.pair
        if call.op == Op.REFETCH:
            offset, length = call.args
            return pair.refetch(offset, length)
        if call.op == Op.RESYNC_WHOLE:
            pair.resync_whole()
        elif call.op == Op.REPAIR_SPOOL:
            pair.repair_spool()
        elif call.op == Op.START_DIRTY:
            # Never over a pending sync, and only once every spooled frame is acknowledged.
            if pair.dirty_mode and pair.sync is None and pair.acked >= pair.spool.last_seq:
                pair.start_sync(SyncKind.DIRTY)
        elif call.op == Op.SYNC_GENERATED:
            (last,) = call.args
            pair.sync_generated(last)
        return None

    def _view(self) -> PairView:
        pair = self.pair
        sync = pair.sync
        return PairView(
            sync=None if sync is None else (sync.kind, sync.s0),
            dirty_mode=pair.dirty_mode,
            lost=tuple(pair.lost),
            revoked=self._revoked.serials,
        )

    @property
    def pid(self) -> int | None:
        proc = self._proc
        return None if proc is None or proc.poll() is not None else proc.pid


def _log_settings() -> tuple[LogLevel, LogFormat]:
    """The agent's logging settings (`configure_logging` set them on the root logger), for its child."""
    root = logging.getLogger()
    level = logging.getLevelName(root.getEffectiveLevel())
    json_logs = any(isinstance(h.formatter, JsonFormatter) for h in root.handlers)
    return (
        LogLevel(level) if level in LogLevel.__members__ else LogLevel.INFO,
        LogFormat.JSON if json_logs else LogFormat.TEXT,
    )
