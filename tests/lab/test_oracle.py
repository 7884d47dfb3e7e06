"""The crash-consistency oracle on hand-made logs."""

from __future__ import annotations

import pytest

from siterecovery.lab import OracleVerdict, verify_log
from siterecovery.lab.records import RECORD_SIZE, RecordKind, encode_record

SLOTS = 600  # more than two read chunks


def _log(records: int, machine: str = "vm-1", markers: tuple[int, ...] = ()) -> bytearray:
    disk = bytearray(SLOTS * RECORD_SIZE)
    buf = bytearray(RECORD_SIZE)
    for seq in range(1, records + 1):
        encode_record(buf, seq, machine, RecordKind.QUIESCE if seq in markers else RecordKind.DATA)
        disk[(seq - 1) * RECORD_SIZE : seq * RECORD_SIZE] = buf
    return disk


def _verify(disk: bytearray, machine: str | None = "vm-1") -> OracleVerdict:
    return verify_log(lambda off, n: bytes(disk[off : off + n]), len(disk), machine)


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
