"""The suite's own instruments, against a peer that is not siterecovery: the writer and the
record check against qemu-nbd (killed and restarted under the writer), and the check's verdicts
on hand-made images."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

from tests.conftest import require_tool
from tests.faults.records import RECORD, RecordWriter, check_image, make_record

RUN = b"r" * 16


def _serve(qemu_nbd: str, image: Path, sock: Path) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        [
            qemu_nbd,
            "--socket",
            str(sock),
            "--format",
            "raw",
            "--persistent",
            "--export-name",
            "data",
            str(image),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 30
    while not sock.exists():
        assert proc.poll() is None and time.monotonic() < deadline, "qemu-nbd did not start"
        time.sleep(0.02)
    return proc


def test_writer_survives_its_export_restarting(tmp_path: Path) -> None:
    qemu_nbd = require_tool("qemu-nbd")
    image, sock = tmp_path / "disk.img", tmp_path / "nbd.sock"
    with open(image, "wb") as f:
        f.truncate(256 * RECORD)
    server = _serve(qemu_nbd, image, sock)
    writer = RecordWriter(sock, "data", capacity=256, rate=500.0, flush_every=8).start()
    try:
        writer.wait_written(40)
        server.send_signal(signal.SIGKILL)  # the export goes away under the writer
        server.wait(10)
        sock.unlink()
        at_kill = writer.written
        server = _serve(qemu_nbd, image, sock)
        writer.wait_written(at_kill + 40)
        writer.stop()
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(10)
    assert writer.reconnects >= 2
    assert writer.flushed == writer.written
    verdict = check_image(image, writer.run_id, 256)
    assert verdict.clean and verdict.prefix == writer.written, verdict


def _image(path: Path, slots: dict[int, bytes], capacity: int = 16) -> Path:
    with open(path, "wb") as f:
        f.truncate(capacity * RECORD)
        for slot, data in slots.items():
            f.seek(slot * RECORD)
            f.write(data)
    return path


def test_check_image_verdicts(tmp_path: Path) -> None:
    good = {n: make_record(RUN, n) for n in range(5)}
    assert check_image(_image(tmp_path / "a", good), RUN, 16).prefix == 5
    assert check_image(_image(tmp_path / "a", good), RUN, 16).clean
    hole = {**good, 7: make_record(RUN, 7)}
    assert (
        check_image(_image(tmp_path / "b", hole), RUN, 16).problem
        == "empty at record 5 but record 7 is there"
    )
    torn = bytearray(make_record(RUN, 5))
    torn[100] ^= 1
    assert "damaged" in check_image(_image(tmp_path / "c", {**good, 5: bytes(torn)}), RUN, 16).problem
    misplaced = {**good, 5: make_record(RUN, 9)}  # a record in another slot is not valid there
    assert not check_image(_image(tmp_path / "d", misplaced), RUN, 16).clean
    other_run = {**good, 5: make_record(b"x" * 16, 5)}
    assert not check_image(_image(tmp_path / "e", other_run), RUN, 16).clean
    assert os.path.getsize(tmp_path / "a") == 16 * RECORD
