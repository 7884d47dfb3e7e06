"""The export tells its sender when it is saturated, and the sender holds its spooled frames back.

The agent's NBD export measures the share of wall time its thread spends on requests
(`nbd.image.BusyMeter`, fed by every connection); the pair publishes "saturated until" in the
spool's shared tail, and the sender child (reading its own mapping of the tail) holds spooled
frames back while it is set, for at most `HOLD_MAX` at a stretch. The clock of the sender's hold is
injected: nothing here depends on the machine's speed.
"""

from __future__ import annotations

import os
import ssl
from pathlib import Path

import pytest
from tests.nbd.conftest import RecordingSink, make_image

from siterecovery.dataplane.assignments import DiskReplication
from siterecovery.dataplane.nbd import image as nbd_image
from siterecovery.dataplane.nbd.image import WAIT_COUNTS_FROM, BusyMeter, Export
from siterecovery.dataplane.nbd.server import run_nbd_server_in_thread
from siterecovery.dataplane.nbd_client import NbdClient
from siterecovery.dataplane.remote_pair import RemotePair
from siterecovery.dataplane.replica import SATURATED, SATURATED_HOLD, PairReplication
from siterecovery.dataplane.sender import HOLD_MAX, PairSender
from siterecovery.dataplane.spool_tail import SpoolTail


class LoadRecordingSink(RecordingSink):
    """A real load-aware sink (`LoadAwareSink`) that keeps the loads it hears."""

    def __init__(self) -> None:
        super().__init__()
        self.loads: list[tuple[float, float]] = []

    def export_load(self, busy: float, now: float) -> None:
        self.loads.append((busy, now))


def test_busy_meter_reports_the_share_of_each_window_spent_on_requests() -> None:
    heard: list[tuple[float, float]] = []
    meter = BusyMeter(lambda busy, now: heard.append((busy, now)), window=1.0, waited=lambda: 0.0)
    meter.add(10.0, 10.3)
    meter.add(10.5, 10.8)  # 0.8 s into the window: not reported yet
    assert heard == []
    meter.add(10.9, 11.1)  # 0.3 + 0.3 + 0.2 of 1.1 s
    assert len(heard) == 1 and heard[0][0] == pytest.approx(0.8 / 1.1) and heard[0][1] == 11.1
    meter.add(15.0, 15.1)  # after an idle stretch: a small share
    assert heard[1][0] == pytest.approx(0.1 / 4.0)


def test_busy_meter_counts_the_time_the_export_waited_for_a_cpu() -> None:
    """On a box where other processes take the CPU, requests wait for the export's thread to run,
    not in its loop: that wait (the kernel's run-queue wait, here injected) counts as busy."""
    heard: list[float] = []
    waited = [5.0]  # seconds the thread has waited, runnable, so far
    meter = BusyMeter(lambda busy, now: heard.append(busy), window=1.0, waited=lambda: waited[0])
    meter.add(10.0, 10.2)
    waited[0] += 0.5
    meter.add(10.8, 11.0)  # 0.4 s of work and 0.5 s waiting for a CPU in a 1 s window
    assert heard == [pytest.approx(0.9)]
    waited[0] += 3.0
    meter.add(11.5, 12.0)  # more waiting than the window: capped
    assert heard[1] == 1.0
    meter.add(12.5, 13.0)  # no wait this time
    assert heard[2] == pytest.approx(0.5)
    waited[0] += 0.8
    meter.add(13.9, 14.0)  # a trickle of work on a busy host: its wait does not count
    assert heard[3] == pytest.approx(0.1) and WAIT_COUNTS_FROM > 0.1


def test_busy_meter_reads_its_own_threads_run_queue_wait() -> None:
    """Without an injected reader the meter reads /proc/thread-self/schedstat (Linux): a share
    between 0 and 1, and the file is closed with the meter."""
    heard: list[float] = []
    meter = BusyMeter(lambda busy, now: heard.append(busy), window=0.01)
    meter.add(1.0, 1.001)
    meter.add(1.5, 1.501)
    assert len(heard) == 1 and 0.0 < heard[0] <= 1.0
    assert meter._schedstat >= 0  # the kernel's schedstat was read (CI runs on Linux)
    meter.close()
    assert meter._schedstat == -2


def test_the_export_reports_its_load_while_it_serves_writes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(nbd_image, "LOAD_WINDOW", 0.0)  # every stretch of work is a window
    image = make_image(tmp_path / "disk.img")
    sink = LoadRecordingSink()
    sock = Path(f"/tmp/nbd-load-{os.getpid()}.sock")
    with (
        run_nbd_server_in_thread([Export.for_image("disk", image, sink)], unix=sock),
        NbdClient.connect("disk", unix=sock, structured=False) as client,
    ):
        for n in range(8):
            client.pwrite(os.urandom(65536), n * 65536)
    assert len(sink.records) == 8 and sink.loads
    assert all(0.0 <= busy <= 1.0 for busy, _ in sink.loads)
    assert [now for _, now in sink.loads] == sorted(now for _, now in sink.loads)


def _never(_msg: object) -> None:
    raise AssertionError("the hold asks nothing of the agent")


def test_sender_holds_spooled_frames_while_the_export_is_saturated(tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    with open(image, "wb") as f:
        f.truncate(16 << 20)
    spec = DiskReplication(pair_id="p", disk="d", process_server="127.0.0.1:1", master_target="127.0.0.1:2")
    pair = PairReplication(spec, image, tmp_path / "agent")
    # The sender child's view: its own mapping of the same tail file.
    remote = RemotePair(spec, image, pair.dir, pair.size, _never)
    sender = PairSender(remote, ssl.create_default_context, "agent")
    now = [100.0]
    sender.clock = lambda: now[0]
    assert not sender._holding()  # nothing published yet: send

    pair.export_load(SATURATED - 0.05, now[0])
    assert not sender._holding() and remote.tail.busy == pytest.approx(SATURATED - 0.05)
    pair.export_load(SATURATED, now[0])
    assert not sender._holding()  # one busy window alone: a client's short burst
    pair.export_load(0.5, now[0])
    pair.export_load(SATURATED, now[0])
    assert not sender._holding()
    pair.export_load(SATURATED, now[0])  # the second in a row
    assert sender._holding()
    # A calmer window does not end it at once; it ends SATURATED_HOLD after the last busy one.
    now[0] += SATURATED_HOLD / 2
    pair.export_load(0.1, now[0])
    assert sender._holding()
    now[0] += SATURATED_HOLD
    assert not sender._holding()

    # A stretch of saturation longer than HOLD_MAX: frames go out again after HOLD_MAX.
    pair.export_load(0.95, now[0])
    now[0] += 0.1
    start = now[0]
    while now[0] < start + HOLD_MAX + 1:
        pair.export_load(0.95, now[0])
        assert sender._holding() == (now[0] - start < HOLD_MAX)
        now[0] += 0.25
    # Once the export is calm again the next saturated stretch is held afresh.
    now[0] += SATURATED_HOLD + 1
    assert not sender._holding()
    pair.export_load(0.95, now[0])
    pair.export_load(0.95, now[0])
    assert sender._holding()
    pair.flush()
    pair.spool.close()


def test_the_tail_tells_a_watcher_what_was_captured_and_how_long_the_sender_held(tmp_path: Path) -> None:
    """A bench reads both from its own mapping, without a stats round through the agent."""
    image = tmp_path / "disk.img"
    with open(image, "wb") as f:
        f.truncate(16 << 20)
    spec = DiskReplication(pair_id="p", disk="d", process_server="127.0.0.1:1", master_target="127.0.0.1:2")
    pair = PairReplication(spec, image, tmp_path / "agent")
    watcher = SpoolTail(pair.dir / "spool.tail")
    assert watcher.captured == pair.captured_seq and watcher.held == 0.0
    data = memoryview(os.urandom(8192))
    pair.record_writes([(0, data[:4096]), (65536, data[4096:])])
    pair.record_write(131072, data[:4096])
    pair.settle()
    assert watcher.captured == pair.captured_seq
    pair.dirty_mode = True  # past the spool's limit a write is only marked, and still counted
    pair.record_zero(0, 4096)
    assert watcher.captured == pair.captured_seq

    remote = RemotePair(spec, image, pair.dir, pair.size, _never)
    sender = PairSender(remote, ssl.create_default_context, "agent")
    ticks = iter([10.0, 10.5, 20.0, 20.25])
    sender.clock = lambda: next(ticks)
    sender._wait_held()
    sender._wait_held()
    assert watcher.held == pytest.approx(0.75)
    pair.flush()
    pair.spool.close()
