"""Kill -9 of a master target whose receive thread reads ahead of its syncs (`mt_inbox.py`).

The test is the process server: over mutual TLS it sends pair `p` eight 1 MiB writes, waits for
their acknowledgement, then forty more (overwriting the first ones) without waiting, recording
every ACK. The master target (`mt_crash_child.py`, a real `MasterTarget` in its own process) is
killed in the second sync with frames queued behind it: after the batch reached the replica
(O_DIRECT from the receive thread's buffers) or after the replica's fdatasync, before the commit
record. The reopened replica must be exactly the state at the journal's last commit, which holds
every acknowledged write and nothing of the unacknowledged batch that had reached the disk.
"""

from __future__ import annotations

import random
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from siterecovery.dataplane.journal import JournaledDisk
from siterecovery.dataplane.links import Identity, connect
from siterecovery.dataplane.master_target import JOURNAL_DIR
from siterecovery.dataplane.protocol import FrameReader, FrameType, FrameWriter, Hello, Role
from siterecovery.pki import CertificateAuthority
from tests.journal.mt_crash_child import FIRST, PAIR, SIZE

MiB = 1 << 20
BURST = 40
SPAN = 24  # the writes cycle over the first 24 MiB: the burst overwrites acknowledged bytes


def _writes() -> list[tuple[int, int, bytes]]:
    """(seq, offset, data) of the whole stream."""
    rnd = random.Random(16)
    return [(i + 1, (i % SPAN) * MiB, rnd.randbytes(MiB)) for i in range(FIRST + BURST)]


def _state_at(seq: int) -> bytes:
    image = bytearray(SIZE)
    for s, offset, data in _writes():
        if s <= seq:
            image[offset : offset + len(data)] = data
    return bytes(image)


def _session(tmp_path: Path, mode: str) -> tuple[subprocess.Popen[bytes], Identity]:
    ca = CertificateAuthority.load_or_create(tmp_path / "ca")
    mt = Identity.in_dir(tmp_path / "mt")
    mt.write(ca.issue("master-target:mt", kind="master-target", component_id="mt"))
    ps = Identity.in_dir(tmp_path / "ps")
    ps.write(ca.issue("process-server:ps", kind="process-server", component_id="ps"))
    child = subprocess.Popen([sys.executable, "-m", "tests.journal.mt_crash_child", str(tmp_path), mode])
    return child, ps


def _wait_file(path: Path, child: subprocess.Popen[bytes]) -> str:
    for _ in range(1200):
        if path.exists():
            return path.read_text()
        assert child.poll() is None, f"the master target exited with {child.returncode}"
        threading.Event().wait(0.05)
    raise AssertionError(f"{path} was not written in 60 s")


@pytest.mark.parametrize("mode", ["written", "synced"])
def test_kill_9_mid_sync_with_frames_read_ahead_loses_nothing_acknowledged(tmp_path: Path, mode: str) -> None:
    child, ps = _session(tmp_path, mode)
    acked: list[int] = []
    try:
        sock = connect(_wait_file(tmp_path / "address", child), ps.client_context())
        writer, reader = FrameWriter(sock), FrameReader(sock)
        writer.send_model(FrameType.HELLO, Hello(component="ps", role=Role.PROCESS_SERVER, pairs=[PAIR]))
        sock.settimeout(120)
        hello = reader.read()
        assert hello is not None and hello.header.type == FrameType.HELLO
        writes = _writes()
        for seq, offset, data in writes[:FIRST]:
            writer.send(FrameType.WRITE, seq=seq, offset=offset, length=len(data), payload=data)
        while not acked or acked[-1] < FIRST:
            frame = reader.read()
            assert frame is not None and frame.header.type == FrameType.ACK
            acked.append(frame.header.seq)

        def burst() -> None:
            try:
                for seq, offset, data in writes[FIRST:]:
                    writer.send(FrameType.WRITE, seq=seq, offset=offset, length=len(data), payload=data)
            except OSError:
                pass  # the master target died: the rest is never sent

        sender = threading.Thread(target=burst, daemon=True)
        sender.start()
        try:
            while (frame := reader.read()) is not None:
                if frame.header.type == FrameType.ACK:
                    acked.append(frame.header.seq)
        except OSError:
            pass  # the connection died with the master target
        assert child.wait(timeout=120) == -9, "the master target did not die at the crash point"
        sender.join(timeout=60)
        sock.close()
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()

    replica = tmp_path / "replica.img"
    at_commit = _state_at(FIRST)
    # The unacknowledged batch had reached the replica: reopening must roll it back.
    assert replica.read_bytes() != at_commit
    with JournaledDisk(replica, tmp_path / "retention" / JOURNAL_DIR / PAIR, 3600.0, name=PAIR) as disk:
        committed = disk.committed_seq
    assert acked and max(acked) == FIRST == committed
    assert replica.read_bytes() == at_commit


def test_a_master_target_without_a_journal_writes_pooled_payloads_and_reuses_them(tmp_path: Path) -> None:
    """The same stream through `DirectApplier`: every payload lands, in order, though each 1 MiB
    buffer goes back to the pool as soon as it is written and is refilled by later frames."""
    child, ps = _session(tmp_path, "direct")
    try:
        sock = connect(_wait_file(tmp_path / "address", child), ps.client_context())
        writer, reader = FrameWriter(sock), FrameReader(sock)
        writer.send_model(FrameType.HELLO, Hello(component="ps", role=Role.PROCESS_SERVER, pairs=[PAIR]))
        sock.settimeout(120)
        hello = reader.read()
        assert hello is not None and hello.header.type == FrameType.HELLO
        writes = _writes()
        for seq, offset, data in writes:
            writer.send(FrameType.WRITE, seq=seq, offset=offset, length=len(data), payload=data)
        acked = -1
        while acked < len(writes):
            frame = reader.read()
            assert frame is not None and frame.header.type == FrameType.ACK
            acked = frame.header.seq
        sock.close()
    finally:
        child.kill()
        child.wait()
    assert (tmp_path / "replica.img").read_bytes() == _state_at(len(writes))
