"""A segment log on open: a torn tail is cut; a damaged frame header followed by intact frames is
damage - the intact frames after it are kept, and the loss is recorded durably for the owner."""

from __future__ import annotations

import os
from pathlib import Path

from siterecovery.dataplane.protocol import HEADER_SIZE, FrameType, encode_frame
from siterecovery.dataplane.segment_log import SegmentLog


def _fill(directory: Path, seqs: range, segment_bytes: int = 64 << 20) -> dict[int, bytes]:
    frames = {s: encode_frame(FrameType.WRITE, 0, s, s * 4096, 4096, os.urandom(4096)) for s in seqs}
    log = SegmentLog(directory, segment_bytes)
    for seq, frame in frames.items():
        log.append(seq, frame[:HEADER_SIZE], frame[HEADER_SIZE:])
    log.close()
    return frames


def read_all(log: SegmentLog) -> list[bytes]:
    cursor = log.cursor(-1)
    buf = bytearray(HEADER_SIZE + 8192)
    out = []
    while (item := cursor.next(buf)) is not None:
        out.append(bytes(item[1]))
    cursor.close()
    return out


def _damage(segment: Path, at: int) -> None:
    raw = bytearray(segment.read_bytes())
    raw[at + 10] ^= 0xFF  # inside the header: its CRC no longer verifies
    segment.write_bytes(bytes(raw))


def test_torn_tail_is_still_cut(tmp_path: Path) -> None:
    frames = _fill(tmp_path, range(1, 6))
    [segment] = tmp_path.glob("*.seg")
    size = segment.stat().st_size
    with open(segment, "r+b") as f:
        f.truncate(size - 100)  # the last frame partly written
    with open(segment, "ab") as f:
        f.write(frames[5][:HEADER_SIZE])  # and a header whose payload never made it
    log = SegmentLog(tmp_path)
    assert read_all(log) == [frames[s] for s in range(1, 5)]
    assert log.last_seq == 4 and not log.damage
    assert segment.stat().st_size == 4 * len(frames[1])
    log.close()


def test_damaged_header_in_the_middle_keeps_the_frames_after_it(tmp_path: Path) -> None:
    frames = _fill(tmp_path, range(1, 9))
    [segment] = tmp_path.glob("*.seg")
    _damage(segment, 3 * len(frames[1]))  # frame 4's header
    log = SegmentLog(tmp_path)
    assert read_all(log) == [frames[s] for s in (1, 2, 3, 5, 6, 7, 8)]  # used to stop at 3
    [damage] = log.damage
    assert (damage.after_seq, damage.resumed_seq, damage.skipped) == (3, 5, len(frames[4]))
    log.close()
    reopened = SegmentLog(tmp_path)  # recorded durably until the owner takes it over
    assert reopened.damage == [damage] and reopened.last_seq == 8
    reopened.clear_damage()
    assert not SegmentLog(tmp_path).damage


def test_damaged_tail_of_a_segment_with_frames_in_the_next_is_damage(tmp_path: Path) -> None:
    frames = _fill(tmp_path, range(1, 9), segment_bytes=3 * (HEADER_SIZE + 4096))
    first, second, _third = sorted(tmp_path.glob("*.seg"))
    _damage(first, 2 * len(frames[1]))  # frame 3, the last of the first segment
    _damage(second, 0)  # frame 4, the first of the second
    log = SegmentLog(tmp_path)
    assert read_all(log) == [frames[s] for s in (1, 2, 5, 6, 7, 8)]
    assert [(d.after_seq, d.resumed_seq) for d in log.damage] == [(2, 5), (2, 5)]
    log.close()


def test_a_wholly_damaged_segment_between_intact_ones_is_damage(tmp_path: Path) -> None:
    frames = _fill(tmp_path, range(1, 10), segment_bytes=3 * (HEADER_SIZE + 4096))
    _first, second, _third = sorted(tmp_path.glob("*.seg"))
    for k in range(3):
        _damage(second, k * len(frames[1]))  # frames 4, 5 and 6
    log = SegmentLog(tmp_path)
    assert read_all(log) == [frames[s] for s in (1, 2, 3, 7, 8, 9)]
    assert [(d.after_seq, d.resumed_seq) for d in log.damage] == [(3, 7)]
    assert not second.exists()
    log.close()


def test_a_live_log_repaired_after_a_reader_met_a_bad_header(tmp_path: Path) -> None:
    from siterecovery.dataplane.protocol import ProtocolError

    frames = {s: encode_frame(FrameType.WRITE, 0, s, 0, 4096, os.urandom(4096)) for s in range(1, 10)}
    log = SegmentLog(tmp_path)
    for seq in range(1, 9):
        log.append(seq, frames[seq][:HEADER_SIZE], frames[seq][HEADER_SIZE:])
    log.sync()
    [segment] = tmp_path.glob("*.seg")
    with open(segment, "r+b") as f:  # in place: the log keeps its descriptor
        for at in (3 * len(frames[1]), 7 * len(frames[1])):  # frames 4 and 8 (the tail)
            f.seek(at + 10)
            f.write(b"\xff")
    try:
        read_all(log)
        raise AssertionError("the bad header was read as a frame")
    except ProtocolError:
        pass
    assert [(d.after_seq, d.resumed_seq) for d in log.repair()] == [(3, 5), (7, 9)]
    log.append(9, frames[9][:HEADER_SIZE], frames[9][HEADER_SIZE:])  # appends go on
    assert read_all(log) == [frames[s] for s in (1, 2, 3, 5, 6, 7, 9)]
    log.close()


def test_a_lost_range_is_reported_until_the_whole_pair_resync_is_applied(tmp_path: Path) -> None:
    from siterecovery.dataplane.healing import Gaps, RefusalLog
    from siterecovery.dataplane.protocol import Flag, Header, digest

    def header(seq: int, flags: Flag) -> Header:
        return Header(FrameType.WRITE, flags, 0, seq, 0, 0, 0, digest(b""))

    refusals = RefusalLog("p1", tmp_path)
    refusals.received(header(40, Flag.MISSING | Flag.RESYNC))  # the agent's spool lost frames
    [entry] = refusals.entries()
    assert (entry.hop.value, entry.seq, entry.resync) == ("agent spool", 40, True)
    assert not refusals.dropped(40)  # that MISSING|RESYNC frame goes downstream as it is
    refusals.acked(60)
    assert not refusals.entries()[0].healed  # the resync has not been reported done
    refusals.received(header(90, Flag.REFETCH | Flag.RESYNC))  # the agent's marker
    refusals.acked(89)
    assert not refusals.entries()[0].healed
    refusals.acked(90)
    assert RefusalLog("p1", tmp_path).entries()[0].healed

    gaps = Gaps(tmp_path)
    gaps.open(40, 0, 0, whole=True)
    gaps.point(50)
    gaps.refetched(4096, 4096)  # a range re-read does not repair a loss of unknown ranges
    gaps.point(60)
    gaps.refetched(0, 0)  # the marker
    gaps.point(95)
    assert not gaps.missing and sorted(gaps.unusable) == [50, 60]
