"""The crash-consistency oracle: does a disk hold a clean prefix of its guest's log?

A guest writes records 1, 2, 3, … one after another, each write completing before the next is
issued. Any crash-consistent copy of its disk (a recovery point, a failed-over or failed-back
disk) must therefore hold records 1..n intact and nothing valid after the first missing or torn
record. One torn or missing record at the end is allowed (a write in flight at the instant of the
cut); a valid record after a gap means writes were lost or reordered, and the verdict names the
first bad record.

The check reads only what may hold a record: a caller that knows which ranges read as zeroes (an NBD
export's block status, a sparse file's holes) passes the others as `data_ranges`, and a slot outside
them is treated exactly as a read of zeroes would be — a gap if the prefix reaches it, nothing to check
after one. Every slot that may hold bytes is still read, so a valid record anywhere after a gap is
found; the cost is the disk's data, not its size.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from siterecovery.dataplane.fileio import is_zero
from siterecovery.lab.records import RECORD_SIZE, ZERO_RECORD, Fault, RecordKind, check_record, record_machine

_CHUNK_RECORDS = 256  # read 1 MiB at a time


@dataclass(frozen=True)
class OracleVerdict:
    ok: bool
    records: int  # length of the clean prefix
    first_bad: int | None  # sequence number of the first bad record when not ok
    reason: str
    machine: str = ""  # machine id found in the log
    quiesce_markers: tuple[int, ...] = ()  # sequence numbers of app-consistent markers in the prefix
    torn_tail: bool = False  # the slot after the prefix holds a partial write (allowed)

    @property
    def last_quiesce(self) -> int | None:
        return self.quiesce_markers[-1] if self.quiesce_markers else None

    @property
    def ends_quiesced(self) -> bool:
        """True when the last record is an app-consistent marker (an app-consistent point)."""
        return self.records > 0 and self.last_quiesce == self.records

    def as_dict(self) -> dict[str, object]:
        return {
            "ok": self.ok,
            "records": self.records,
            "first_bad": self.first_bad,
            "reason": self.reason,
            "machine": self.machine,
            "quiesce_markers": list(self.quiesce_markers),
            "torn_tail": self.torn_tail,
        }


def _slot_runs(data_ranges: Sequence[tuple[int, int]] | None, slots: int) -> Iterator[tuple[int, int]]:
    """[first, end) slot runs touching `data_ranges` (byte ranges), merged, in order, within `slots`."""
    if data_ranges is None:
        yield 0, slots
        return
    first = end = 0
    for offset, length in sorted(data_ranges):
        # Round outwards: a slot partly inside a data range may hold a record.
        lo, hi = offset // RECORD_SIZE, min(slots, -(-(offset + length) // RECORD_SIZE))
        if lo >= hi:
            continue
        if lo > end:
            if end > first:
                yield first, end
            first = lo
        end = max(end, hi)
    if end > first:
        yield first, end


def verify_log(
    read_at: Callable[[int, int], bytes],
    size: int,
    machine: str | None = None,
    *,
    data_ranges: Sequence[tuple[int, int]] | None = None,
) -> OracleVerdict:
    """Check the log on a disk of `size` bytes read through `read_at(offset, length)`.

    `machine` None accepts the machine id of record 1 (and then requires it of every record).
    `data_ranges` (offset, length) are the only bytes that may be non-zero; None means all of them.
    """
    slots = size // RECORD_SIZE
    records = 0
    markers: list[int] = []
    gap: int | None = None  # sequence number of the first slot not holding its record
    gap_fault: Fault | None = None
    owner = machine
    for first, end in _slot_runs(data_ranges, slots):
        if gap is None and first > records:
            gap, gap_fault = records + 1, Fault.EMPTY  # the prefix runs into zeroes the server vouched for
        for start in range(first, end, _CHUNK_RECORDS):
            count = min(_CHUNK_RECORDS, end - start)
            chunk = memoryview(read_at(start * RECORD_SIZE, count * RECORD_SIZE))
            if gap is not None and is_zero(chunk):
                continue  # nothing written here: the fast path over unwritten data ranges
            for i in range(count):
                seq = start + i + 1
                record = chunk[i * RECORD_SIZE : (i + 1) * RECORD_SIZE]
                if gap is None:
                    fault, kind = check_record(record, seq, owner)
                    if fault is None:
                        owner = owner or record_machine(record)
                        records = seq
                        if kind is RecordKind.QUIESCE:
                            markers.append(seq)
                        continue
                    gap, gap_fault = seq, fault
                    if fault is Fault.WRONG_MACHINE and seq == 1:
                        return OracleVerdict(
                            False,
                            0,
                            1,
                            f"record 1 was written by machine {record_machine(record)!r}, not {machine!r}",
                            machine=record_machine(record),
                        )
                    continue
                if record == ZERO_RECORD:
                    continue
                fault, _ = check_record(record, None, owner)
                if fault is None:
                    return OracleVerdict(
                        False,
                        records,
                        gap,
                        f"record {gap} is {gap_fault} but record at slot {seq} after it is valid "
                        f"(writes lost or reordered)",
                        machine=owner or "",
                        quiesce_markers=tuple(markers),
                    )
    torn = gap_fault not in (None, Fault.EMPTY)
    if records == 0 and not torn:
        reason = "empty log"
    else:
        reason = f"clean prefix of {records} records" + (f"; record {gap} torn ({gap_fault})" if torn else "")
    return OracleVerdict(
        True, records, None, reason, machine=owner or "", quiesce_markers=tuple(markers), torn_tail=torn
    )


def verify_image(path: str, machine: str | None = None) -> OracleVerdict:
    """Run the oracle over an image file read directly (the machine is off), skipping its holes."""
    with open(path, "rb") as f:
        size = f.seek(0, 2)

        def read_at(offset: int, length: int) -> bytes:
            return os.pread(f.fileno(), length, offset)

        return verify_log(read_at, size, machine, data_ranges=file_data_ranges(f.fileno(), size))


def file_data_ranges(fd: int, size: int) -> list[tuple[int, int]] | None:
    """The file's data (non-hole) ranges from SEEK_DATA/SEEK_HOLE; None where it cannot tell."""
    ranges: list[tuple[int, int]] = []
    pos = 0
    while pos < size:
        try:
            data = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # only a hole from pos to the end
                break
            return None  # no SEEK_DATA on this file system: read everything
        hole = min(size, os.lseek(fd, data, os.SEEK_HOLE))
        if data >= hole:
            break
        ranges.append((data, hole - data))
        pos = hole
    return ranges
