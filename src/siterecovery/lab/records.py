"""The guest's self-verifying log record: fixed size, numbered, derived payload, checksummed.

Record `n` (1-based) lives at byte offset `(n - 1) * RECORD_SIZE` of the guest's disk. Its header
names the writing machine and the sequence number; the payload is a pure function of machine and
sequence number, and an xxh3-64 checksum covers everything before it. A record is therefore valid
only if it is whole, in the right place and written by the right machine, so any torn, misplaced,
stale or foreign block is detected without keeping any state outside the disk.
"""

from __future__ import annotations

import random
import struct
from enum import IntEnum, StrEnum

import xxhash

RECORD_SIZE = 4096
MAGIC = b"SRLOG\x00v1"
MACHINE_FIELD = 40
_HEADER = struct.Struct(f"<8sQII{MACHINE_FIELD}s")
_CHECKSUM = struct.Struct("<Q")
PAYLOAD_OFFSET = _HEADER.size
CHECKSUM_OFFSET = RECORD_SIZE - _CHECKSUM.size
PAYLOAD_SIZE = CHECKSUM_OFFSET - PAYLOAD_OFFSET
ZERO_RECORD = bytes(RECORD_SIZE)


class RecordKind(IntEnum):
    DATA = 1
    QUIESCE = 2  # written after a flush while the guest is frozen: an app-consistent marker


class Fault(StrEnum):
    """Why a record slot does not hold the expected record."""

    EMPTY = "empty"  # never written (all zeros)
    BAD_MAGIC = "bad-magic"
    BAD_CHECKSUM = "bad-checksum"  # torn or corrupted
    BAD_PAYLOAD = "bad-payload"
    WRONG_SEQUENCE = "wrong-sequence"
    WRONG_MACHINE = "wrong-machine"


def payload(machine: str, seq: int) -> bytes:
    """The payload of record `seq`: pseudo-random (so compression and dedup can't hide bugs)."""
    seed = xxhash.xxh3_64_intdigest(f"{machine}:{seq}".encode())
    return random.Random(seed).randbytes(PAYLOAD_SIZE)


def encode_record(buf: bytearray, seq: int, machine: str, kind: RecordKind = RecordKind.DATA) -> None:
    """Fill `buf` (RECORD_SIZE bytes, reused by the caller) with record `seq`."""
    name = machine.encode()
    if len(name) > MACHINE_FIELD:
        raise ValueError(f"machine id {machine!r} is longer than {MACHINE_FIELD} bytes")
    _HEADER.pack_into(buf, 0, MAGIC, seq, int(kind), 0, name)
    buf[PAYLOAD_OFFSET:CHECKSUM_OFFSET] = payload(machine, seq)
    _CHECKSUM.pack_into(buf, CHECKSUM_OFFSET, xxhash.xxh3_64_intdigest(memoryview(buf)[:CHECKSUM_OFFSET]))


def record_machine(record: bytes | memoryview) -> str:
    return bytes(record[16 + 8 : PAYLOAD_OFFSET]).rstrip(b"\0").decode(errors="replace")


def check_record(
    record: bytes | memoryview, seq: int | None, machine: str | None
) -> tuple[Fault | None, RecordKind]:
    """Check one record slot; `seq`/`machine` None accept any sequence number / machine.

    Returns (None, kind) for a valid record, else (fault, DATA).
    """
    view = memoryview(record)
    magic, got_seq, kind, _reserved, raw_machine = _HEADER.unpack_from(view, 0)
    if magic != MAGIC:
        return (Fault.EMPTY if view == ZERO_RECORD else Fault.BAD_MAGIC), RecordKind.DATA
    (checksum,) = _CHECKSUM.unpack_from(view, CHECKSUM_OFFSET)
    if checksum != xxhash.xxh3_64_intdigest(view[:CHECKSUM_OFFSET]):
        return Fault.BAD_CHECKSUM, RecordKind.DATA
    got_machine = bytes(raw_machine).rstrip(b"\0").decode(errors="replace")
    if machine is not None and got_machine != machine:
        return Fault.WRONG_MACHINE, RecordKind.DATA
    if seq is not None and got_seq != seq:
        return Fault.WRONG_SEQUENCE, RecordKind.DATA
    if view[PAYLOAD_OFFSET:CHECKSUM_OFFSET] != payload(got_machine, got_seq):
        return Fault.BAD_PAYLOAD, RecordKind.DATA
    try:
        return None, RecordKind(kind)
    except ValueError:
        return Fault.BAD_MAGIC, RecordKind.DATA
