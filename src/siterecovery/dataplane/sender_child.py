"""The sender child's entry point: `python -m siterecovery.dataplane.sender_child FD`.

Started by the agent (`sender_process.py`) with one end of a Unix socket pair as `FD`. It reads
the `Start` message, runs a `PairSender` on a `RemotePair` and relays: the sender's calls to the
agent and their replies, acknowledgements, and its progress every `PROGRESS_INTERVAL` seconds (for
the agent's heartbeats). It stops on `Stop`, and exits at once when the agent's end closes: the
agent died, and whatever was not acknowledged stays in the spool for the next agent. Everything
is imported before `Start` is read: a spare child started ahead (`SpareChild`) has paid for its
imports by the time a pair needs it.
"""

from __future__ import annotations

import logging
import os
import queue
import ssl
import sys
import threading
from multiprocessing.connection import Connection

from siterecovery import pki
from siterecovery.dataplane.remote_pair import RemotePair
from siterecovery.dataplane.sender import PairSender
from siterecovery.dataplane.sender_link import Call, Progress, Reply, Start, Stop
from siterecovery.logs import PAIR_ID, configure_logging

log = logging.getLogger(__name__)

PROGRESS_INTERVAL = 0.25


class _Link:
    """The child's end: calls wait for their reply; a reader thread takes everything the agent sends."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn
        self._send_lock = threading.Lock()
        self._call_lock = threading.Lock()
        self._replies: queue.Queue[Reply] = queue.Queue()
        self.stop = threading.Event()

    def send(self, msg: object) -> Reply | None:
        if isinstance(msg, Call):
            with self._call_lock:  # one call at a time: replies come back in order
                self._post(msg)
                return self._replies.get()
        self._post(msg)
        return None

    def _post(self, msg: object) -> None:
        try:
            with self._send_lock:
                self._conn.send(msg)
        except OSError:
            os._exit(0)  # the agent is gone

    def read(self) -> None:
        try:
            while True:
                msg = self._conn.recv()
                if isinstance(msg, Reply):
                    self._replies.put(msg)
                elif isinstance(msg, Stop):
                    self.stop.set()
        except (EOFError, OSError):
            pass
        if not self.stop.is_set():
            os._exit(0)  # the agent died: its spool holds everything not acknowledged


def main(argv: list[str]) -> int:
    conn = Connection(int(argv[0]))
    try:
        start = conn.recv()
    except (EOFError, OSError):
        return 0  # a spare the agent never used (`SpareChild`): the agent stopped or died

    if not isinstance(start, Start):
        return 2
    configure_logging(start.log_level, start.log_format)
    PAIR_ID.set(start.spec.pair_id)
    link = _Link(conn)
    threading.Thread(target=link.read, name="agent-link", daemon=True).start()
    pair = RemotePair(start.spec, start.image, start.pair_dir, start.size, link.send, start.bytes_sent)

    def context() -> ssl.SSLContext:
        return pki.client_context(start.cert, start.key, start.ca)

    sender = PairSender(pair, context, start.component)
    sender.start()
    reported: Progress | None = None
    while not link.stop.wait(PROGRESS_INTERVAL):
        now = Progress(pair.bytes_sent, pair.bytes_done, pair.bytes_total, sender.last_error)
        if now != reported:
            link.send(now)
            reported = now
    sender.stop()
    link.send(Progress(pair.bytes_sent, pair.bytes_done, pair.bytes_total, sender.last_error))
    conn.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
