"""A lab machine's guest: a real process writing a self-verifying log through the NBD export.

On start it runs the oracle over the disk it finds (reporting whether it holds a clean prefix of
the log) and then appends records after that prefix, one write completing before the next is
issued, flushing every few records. Signals drive it like a guest OS: SIGUSR1 freezes it (flush,
write a quiesce-marker record, flush, then pause: an app-consistent point), SIGUSR2 thaws it,
SIGTERM shuts it down cleanly; SIGKILL is a crash. Its progress goes to a JSON status file that a
peer guest can follow (`--after`) to write record n only after the peer has flushed record n, which
makes a replication group's members causally dependent.

    python -m siterecovery.lab.guest --unix SOCKET --export LABEL --machine ID --status FILE
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from types import FrameType

from pydantic import BaseModel

from siterecovery.dataplane.nbd_client import NbdClient
from siterecovery.lab.oracle import verify_log
from siterecovery.lab.records import RECORD_SIZE, RecordKind, encode_record

_POLL = 0.02


class GuestState(StrEnum):
    RUNNING = "running"
    QUIESCED = "quiesced"
    FULL = "full"  # the log reached the end of the disk; the guest idles
    STOPPED = "stopped"
    FAILED = "failed"


class GuestStatus(BaseModel):
    pid: int
    machine: str
    state: GuestState
    seq: int  # last record written
    flushed: int  # last record known durable on the export
    quiesce_seq: int | None = None  # the marker written by the last freeze
    start_verdict: dict[str, object]
    error: str = ""
    updated_at: float


def write_status(path: Path, status: GuestStatus) -> None:
    # Progress, not data: an atomic rename suffices; fsync would only slow the workload down.
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(status.model_dump_json())
    os.replace(tmp, path)


def read_status(path: Path) -> GuestStatus | None:
    try:
        return GuestStatus.model_validate_json(path.read_bytes())
    except FileNotFoundError:
        return None


@dataclass
class _Signals:
    stop: bool = False
    freeze: bool = False
    thaw: bool = False

    def install(self) -> None:
        signal.signal(signal.SIGTERM, self._on_stop)
        signal.signal(signal.SIGINT, self._on_stop)
        signal.signal(signal.SIGUSR1, self._on_freeze)
        signal.signal(signal.SIGUSR2, self._on_thaw)

    def _on_stop(self, signum: int, frame: FrameType | None) -> None:
        self.stop = True

    def _on_freeze(self, signum: int, frame: FrameType | None) -> None:
        self.freeze, self.thaw = True, False

    def _on_thaw(self, signum: int, frame: FrameType | None) -> None:
        self.thaw, self.freeze = True, False


class Guest:
    def __init__(
        self,
        client: NbdClient,
        machine: str,
        status_path: Path,
        *,
        rate: float,
        flush_every: int,
        after: Path | None,
        max_records: int,
    ) -> None:
        self.client = client
        self.machine = machine
        self.status_path = status_path
        self.rate = rate
        self.flush_every = max(1, flush_every)
        self.after = after
        self.slots = client.size // RECORD_SIZE
        self.limit = min(self.slots, max_records) if max_records else self.slots
        self.signals = _Signals()
        self.buf = bytearray(RECORD_SIZE)
        # Block status (when the export offers it) lets the check skip what reads as zeroes: the
        # boot check then costs the disk's data, not its size (failover downtime is measured on it).
        verdict = verify_log(
            lambda off, n: client.pread(n, off), client.size, machine, data_ranges=client.data_ranges()
        )
        self.status = GuestStatus(
            pid=os.getpid(),
            machine=machine,
            state=GuestState.RUNNING,
            seq=verdict.records,
            flushed=verdict.records,
            start_verdict=verdict.as_dict(),
            updated_at=time.time(),
        )
        self.publish()

    def publish(self, state: GuestState | None = None) -> None:
        if state is not None:
            self.status.state = state
        self.status.updated_at = time.time()
        write_status(self.status_path, self.status)

    def _flush(self) -> None:
        self.client.flush()
        self.status.flushed = self.status.seq
        self.publish()

    def _write(self, kind: RecordKind) -> None:
        seq = self.status.seq + 1
        encode_record(self.buf, seq, self.machine, kind)
        self.client.pwrite(self.buf, (seq - 1) * RECORD_SIZE)
        self.status.seq = seq

    def _idle_until(self, done: float) -> None:
        while not (self.signals.stop or self.signals.freeze) and time.monotonic() < done:
            time.sleep(min(_POLL, max(0.0, done - time.monotonic())))

    def _peer_has(self, seq: int) -> bool:
        assert self.after is not None
        peer = read_status(self.after)
        return peer is not None and peer.flushed >= seq

    def _freeze(self) -> None:
        self._flush()
        if self.status.seq < self.limit:
            self._write(RecordKind.QUIESCE)
            self.status.quiesce_seq = self.status.seq
        self._flush()
        self.publish(GuestState.QUIESCED)
        while not (self.signals.thaw or self.signals.stop):
            time.sleep(_POLL)
        self.signals.thaw = False
        self.publish(GuestState.RUNNING)

    def run(self) -> None:
        self.signals.install()
        started, written = time.monotonic(), 0
        while not self.signals.stop:
            if self.signals.freeze:
                self.signals.freeze = False
                self._freeze()
                started, written = time.monotonic(), 0
                continue
            if self.status.seq >= self.limit:
                if self.status.state is not GuestState.FULL:
                    self._flush()
                    self.publish(GuestState.FULL)
                self._idle_until(time.monotonic() + 1.0)
                continue
            if self.after is not None and not self._peer_has(self.status.seq + 1):
                self._idle_until(time.monotonic() + _POLL)
                continue
            self._write(RecordKind.DATA)
            written += 1
            if written % self.flush_every == 0:
                self._flush()
            if self.rate > 0:
                self._idle_until(started + written / self.rate)
        self._flush()
        self.publish(GuestState.STOPPED)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m siterecovery.lab.guest",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--unix", type=Path, required=True, help="the machine's NBD socket")
    parser.add_argument("--export", required=True, help="export (disk label) holding the log")
    parser.add_argument("--machine", required=True, help="machine id written into every record")
    parser.add_argument("--status", type=Path, required=True, help="JSON progress file")
    parser.add_argument("--rate", type=float, default=64.0, help="records per second, 0 = unlimited")
    parser.add_argument("--flush-every", type=int, default=16, help="records between flushes")
    parser.add_argument("--after", type=Path, help="peer's status file: write n only after it flushed n")
    parser.add_argument("--max-records", type=int, default=0, help="stop writing after this many records")
    args = parser.parse_args(argv)
    client = NbdClient.connect(args.export, unix=args.unix)
    try:
        guest = Guest(
            client,
            args.machine,
            args.status,
            rate=args.rate,
            flush_every=args.flush_every,
            after=args.after,
            max_records=args.max_records,
        )
        print(f"guest {args.machine}: start verdict {guest.status.start_verdict}", flush=True)
        try:
            guest.run()
        except Exception as exc:
            guest.status.error = str(exc)
            guest.publish(GuestState.FAILED)
            raise
    finally:
        client.close()
    sys.exit(0)


if __name__ == "__main__":
    main()
