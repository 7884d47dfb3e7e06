"""The crash-consistency oracle on hand-made logs."""

from __future__ import annotations

from pathlib import Path

import pytest

from siterecovery.lab import OracleVerdict, verify_image, verify_log
from siterecovery.lab.oracle import file_data_ranges
from siterecovery.lab.records import RECORD_SIZE, RecordKind, encode_record

SLOTS = 600  # more than two read chunks


def _log(records: int, machine: str = "vm-1", markers: tuple[int, ...] = ()) -> bytearray:
    disk = bytearray(SLOTS * RECORD_SIZE)
    buf = bytearray(RECORD_SIZE)
    for seq in range(1, records + 1):
        encode_record(buf, seq, machine, RecordKind.QUIESCE if seq in markers else RecordKind.DATA)
        disk[(seq - 1) * RECORD_SIZE : seq * RECORD_SIZE] = buf
    return disk


def _data_ranges(disk: bytearray, sector: int = 512) -> list[tuple[int, int]]:
    """The non-zero sectors, merged: what an export's block status reports as data on this disk."""
    ranges: list[tuple[int, int]] = []
    for off in range(0, len(disk), sector):
        if any(disk[off : off + sector]):
            if ranges and sum(ranges[-1]) == off:
                ranges[-1] = (ranges[-1][0], ranges[-1][1] + sector)
            else:
                ranges.append((off, sector))
    return ranges


def _verify(disk: bytearray, machine: str | None = "vm-1") -> OracleVerdict:
    """The verdict reading everything, checked equal to the one reading only the data ranges."""
    full = verify_log(lambda off, n: bytes(disk[off : off + n]), len(disk), machine)
    ranges = _data_ranges(disk)
    reads: list[tuple[int, int]] = []

    def read_at(off: int, n: int) -> bytes:
        reads.append((off, n))
        return bytes(disk[off : off + n])

    sparse = verify_log(read_at, len(disk), machine, data_ranges=ranges)
    assert sparse == full
    # Nothing is read that lies wholly outside the data ranges (slots are rounded outwards).
    for off, n in reads:
        for slot in range(off, off + n, RECORD_SIZE):
            assert any(o < slot + RECORD_SIZE and slot < o + ln for o, ln in ranges), slot
    return full


def _slot(seq: int) -> slice:
    return slice((seq - 1) * RECORD_SIZE, seq * RECORD_SIZE)


def test_clean_prefix_with_markers() -> None:
    verdict = _verify(_log(300, markers=(100, 300)))
    assert verdict.ok and verdict.records == 300 and verdict.quiesce_markers == (100, 300)
    assert verdict.ends_quiesced and not verdict.torn_tail


def test_full_and_empty_logs() -> None:
    assert _verify(_log(SLOTS)).records == SLOTS
    empty = _verify(_log(0))
    assert empty.ok and empty.records == 0 and empty.reason == "empty log"


def test_torn_last_record_is_allowed() -> None:
    disk = _log(50)
    disk[_slot(51)] = _log(51)[_slot(51)][:1000].ljust(RECORD_SIZE, b"\0")  # half-written record 51
    verdict = _verify(disk)
    assert verdict.ok and verdict.records == 50 and verdict.torn_tail


@pytest.mark.parametrize(
    ("damage", "first_bad"),
    [
        pytest.param(lambda d: d.__setitem__(_slot(7), bytes(RECORD_SIZE)), 7, id="lost-write"),
        pytest.param(
            lambda d: d.__setitem__(slice(9 * RECORD_SIZE + 99, 9 * RECORD_SIZE + 100), b"X"),
            10,
            id="flipped-byte",
        ),
        pytest.param(lambda d: d.__setitem__(_slot(4), d[_slot(5)]), 4, id="misplaced-record"),
        pytest.param(
            lambda d: d.__setitem__(_slot(3), _log(3, machine="vm-2")[_slot(3)]), 3, id="foreign-record"
        ),
        pytest.param(
            lambda d: d.__setitem__(_slot(500), _log(500)[_slot(500)]), 201, id="valid-far-after-gap"
        ),
    ],
)
def test_damage_fails_and_names_the_first_bad_record(damage: object, first_bad: int) -> None:
    disk = _log(200)
    damage(disk)  # type: ignore[operator]
    verdict = _verify(disk)
    assert not verdict.ok and verdict.first_bad == first_bad
    assert f"record {first_bad}" in verdict.reason


def test_log_of_another_machine_is_rejected() -> None:
    verdict = _verify(_log(20, machine="vm-2"))
    assert not verdict.ok and verdict.first_bad == 1 and "vm-2" in verdict.reason
    assert _verify(_log(20, machine="vm-2"), machine=None).ok


def test_data_ranges_skip_holes_but_not_a_valid_record_after_the_gap() -> None:
    # Records 1..100, a hole, then one valid record 500 in a range that starts mid-slot.
    disk = _log(100)
    disk[_slot(500)] = _log(500)[_slot(500)]
    reads: list[int] = []

    def read_at(off: int, n: int) -> bytes:
        reads.append(n)
        return bytes(disk[off : off + n])

    ranges = [(0, 100 * RECORD_SIZE), (499 * RECORD_SIZE + 512, 512)]
    verdict = verify_log(read_at, len(disk), "vm-1", data_ranges=ranges)
    assert not verdict.ok and verdict.first_bad == 101 and "slot 500" in verdict.reason
    assert sum(reads) == 101 * RECORD_SIZE  # the prefix and the one slot, not the 600-slot disk
    # The same disk claimed all-zero after the prefix: the oracle trusts the claim and reads no more.
    assert verify_log(read_at, len(disk), "vm-1", data_ranges=ranges[:1]).records == 100


def test_prefix_ending_at_a_hole_is_a_clean_prefix() -> None:
    disk = _log(300)
    hole_after = [(0, 300 * RECORD_SIZE)]
    verdict = verify_log(lambda off, n: bytes(disk[off : off + n]), len(disk), None, data_ranges=hole_after)
    assert verdict.ok and verdict.records == 300 and verdict.machine == "vm-1"
    nothing = verify_log(lambda off, n: bytes(n), len(disk), None, data_ranges=[])
    assert nothing.ok and nothing.reason == "empty log"


def test_verify_image_reads_a_sparse_file_by_its_data(tmp_path: Path) -> None:
    disk = _log(100)
    disk[_slot(500)] = _log(500)[_slot(500)]
    image = tmp_path / "disk.img"
    with open(image, "wb") as f:
        f.truncate(64 * 1024 * 1024)  # a sparse disk much larger than the log
        f.write(disk[: 100 * RECORD_SIZE])
        f.seek(499 * RECORD_SIZE)
        f.write(disk[_slot(500)])
    with open(image, "rb") as f:
        ranges = file_data_ranges(f.fileno(), 64 * 1024 * 1024)
    assert ranges is not None and sum(n for _, n in ranges) < 1024 * 1024  # holes are known as holes
    verdict = verify_image(str(image), "vm-1")
    assert not verdict.ok and verdict.first_bad == 101 and "slot 500" in verdict.reason
