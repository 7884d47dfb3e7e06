"""The write-intent (activity) log: marked before the image, batched, unmarked once durable.

The export's writer is not our code: an interactive `qemu-io` (`tests/qemu_io_writer.py`), each
command answered before the test looks at the log, so the log is checked between the requests of
one connection.
"""

from __future__ import annotations

from pathlib import Path

from tests.qemu_io_writer import RECORD, QemuIoSession, record_file

from siterecovery.dataplane.activity_log import AHEAD, AHEAD_MAX, EXTENT, ActivityLog
from siterecovery.dataplane.nbd.image import Export
from siterecovery.dataplane.nbd.server import run_nbd_server_in_thread

MiB = 1 << 20
SIZE = 64 * MiB


class FakeSink:
    """Stands in for the spool: counts flushes (no real peer needed to observe the log)."""

    def __init__(self) -> None:
        self.writes = 0
        self.flushes = 0

    def record_write(self, offset: int, data: memoryview) -> int:
        self.writes += 1
        return self.writes

    def record_zero(self, offset: int, length: int) -> int:
        self.writes += 1
        return self.writes

    def flush(self) -> None:
        self.flushes += 1


def _image(tmp_path: Path) -> Path:
    path = tmp_path / "disk.img"
    with open(path, "wb") as f:
        f.truncate(SIZE)
    return path


def test_a_hot_extent_costs_one_mark_and_is_unmarked_after_a_flush(tmp_path: Path) -> None:
    image = _image(tmp_path)
    log = ActivityLog(tmp_path / "disk.al", SIZE)
    sink = FakeSink()
    sock = tmp_path / "d.sock"
    with run_nbd_server_in_thread([Export.for_image("d", image, sink, intent=log)], unix=sock):
        qemu_io = QemuIoSession(sock, "d")
        try:
            for slot in range(200):  # 800 KiB: all in extent 0
                qemu_io.write(slot * RECORD, record_file(tmp_path, slot))
            assert sink.writes == 200
            assert log.commits == 1 and log.marked == 1
            qemu_io.cmd("flush")
            assert sink.flushes >= 1
            # A new extent: extent 0 is unmarked in the same write.
            qemu_io.write(2 * EXTENT, record_file(tmp_path, 0, seed=2))
            assert log.commits == 2 and log.marked == 1
            # Left as it is (no clean stop): a reopened log holds extent 2 only.
            assert ActivityLog(tmp_path / "disk.al", SIZE).recovered == [2]
            qemu_io.close()
        finally:
            qemu_io.kill()
    # The export's clean stop flushed and unmarked everything.
    assert ActivityLog(tmp_path / "disk.al", SIZE).recovered == []


def test_marks_are_bounded_by_flushing_the_sink(tmp_path: Path) -> None:
    log = ActivityLog(tmp_path / "disk.al", SIZE, limit=4)
    flushes: list[int] = []

    def flush() -> None:
        flushes.append(1)
        log.flushed(log.checkpoint())

    for e in range(10):
        log.mark([(e * EXTENT, RECORD)], flush)
        log.recorded(e * EXTENT, RECORD)
        assert log.marked <= 4
    assert flushes, "the log grew past its limit without making room"
    assert len(ActivityLog(tmp_path / "disk.al", SIZE).recovered) <= 4


def test_a_log_of_another_geometry_compares_every_extent(tmp_path: Path) -> None:
    ActivityLog(tmp_path / "disk.al", SIZE).mark([(0, RECORD)], lambda: None)
    assert ActivityLog(tmp_path / "disk.al", 2 * SIZE).recovered == list(range(2 * SIZE // EXTENT))


def test_a_sequential_stream_is_marked_ahead_and_every_write_stays_covered(tmp_path: Path) -> None:
    """1 MiB writes through 16 extents: a mark per AHEAD + 1 extents, not one per extent, and every
    write is covered by a durable mark before it is written (checked on the file itself)."""
    log = ActivityLog(tmp_path / "disk.al", SIZE)
    for offset in range(0, 16 * EXTENT, MiB):
        if not log.covers(offset, MiB):
            log.mark([(offset, MiB)], lambda: None)
        assert offset // EXTENT in _marked_on_disk(tmp_path / "disk.al")  # what a crash would find
        log.recorded(offset, MiB)
    assert log.commits <= 1 + 16 // (AHEAD + 1) + 1, log.commits


def test_a_long_stream_marks_ahead_as_far_as_it_has_run(tmp_path: Path) -> None:
    """Through 1024 extents (4 GiB): one mark per doubling of the run, then one per AHEAD_MAX."""
    size = 1024 * EXTENT
    log = ActivityLog(tmp_path / "disk.al", size)
    for offset in range(0, size, EXTENT):
        if not log.covers(offset, EXTENT):
            log.mark([(offset, EXTENT)], lambda: None)
            assert offset // EXTENT in ActivityLog(_copy(tmp_path / "disk.al"), size).recovered
        log.recorded(offset, EXTENT)
    # 0, 1 (+7), 9, 19, 39, 79, 159 (+159 ... +255 from here on): 9 marks, not 128.
    assert log.commits <= 2 + 6 + size // EXTENT // AHEAD_MAX, log.commits


def _copy(path: Path) -> Path:
    copy = path.with_name("crash-copy.al")
    copy.write_bytes(path.read_bytes())
    return copy


def _marked_on_disk(path: Path) -> list[int]:
    copy = path.with_name("crash-copy.al")
    copy.write_bytes(path.read_bytes())
    return ActivityLog(copy, SIZE).recovered
