"""End to end: agent → process server → master target as real processes over mutual TLS."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from tests.conftest import require_tool
from tests.dataplane.conftest import (
    Plane,
    make_image,
    pair_stats,
    random_image,
    replication,
    wait_for,
    wait_replicated,
)

from siterecovery.dataplane.sender_process import PID_FILE, SENDER_NICE

MiB = 1 << 20


def compare(a: Path, b: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [require_tool("qemu-img"), "compare", "-f", "raw", "-F", "raw", str(a), str(b)],
        capture_output=True,
        text=True,
    )


def start_plane(plane: Plane, src: Path, size: int, mode: str = "full") -> tuple[object, object, object]:
    target = plane.root / "target.img"
    mt = plane.master_target([{"pair_id": "p1", "path": str(target), "size": size}]).start()
    ps = plane.process_server().start()
    ps_addr, mt_addr = ps.wait_address(), mt.wait_address()
    agent = plane.agent([replication("p1", "d0", ps_addr, mt_addr, mode)], {"d0": src}).start()
    return agent, ps, mt


def test_qemu_io_pattern_reaches_target_identical(plane: Plane) -> None:
    """MT-1: the master target writes what the agent captured to the target disk."""
    qemu_io = require_tool("qemu-io")
    size = 32 * MiB
    src = make_image(plane.root / "src.img", size, [(1 * MiB, 2 * MiB, 0xAB)])
    agent, _ps, mt = start_plane(plane, src, size)
    sock = plane.root / "nbd" / "d0.sock"
    wait_for(sock.exists, 120, "the NBD export")
    out = subprocess.run(
        [
            qemu_io,
            "-f",
            "raw",
            "-c",
            "write -P 0x5a 4M 1M",
            "-c",
            "write -P 0x33 9M 64k",
            "-c",
            "write -z 1M 512k",
            "-c",
            "flush",
            f"nbd+unix:///d0?socket={sock}",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "wrote 1048576/1048576" in out.stdout
    wait_replicated(agent, mt, "p1")  # type: ignore[arg-type]
    result = compare(src, plane.root / "target.img")
    assert result.returncode == 0, result.stdout + result.stderr
    # The sender child yields the CPU to the export: SENDER_NICE levels below the agent (issue 16).
    child = int((agent.state_dir / "pairs" / "p1" / PID_FILE).read_text())  # type: ignore[attr-defined]
    agent_nice = os.getpriority(os.PRIO_PROCESS, agent.proc.pid)  # type: ignore[attr-defined]
    assert os.getpriority(os.PRIO_PROCESS, child) == min(19, agent_nice + SENDER_NICE)


def test_nbdcopy_random_image_reaches_target_identical(plane: Plane) -> None:
    nbdcopy = require_tool("nbdcopy")
    size = 16 * MiB
    src = make_image(plane.root / "src.img", size)
    data = random_image(plane.root / "data.img", size, [(0, 6 * MiB), (10 * MiB, 3 * MiB)])
    agent, _ps, mt = start_plane(plane, src, size)
    sock = plane.root / "nbd" / "d0.sock"
    wait_for(sock.exists, 120, "the NBD export")
    subprocess.run([nbdcopy, str(data), f"nbd+unix:///d0?socket={sock}"], check=True, capture_output=True)
    wait_replicated(agent, mt, "p1")  # type: ignore[arg-type]
    assert compare(data, plane.root / "target.img").returncode == 0
    assert pair_stats(agent, "p1")["bytes_sent"] > 9 * MiB  # type: ignore[operator,index]


def test_delta_resync_sends_about_the_changed_bytes(plane: Plane) -> None:
    size = 256 * MiB
    src = random_image(plane.root / "src.img", size, [(0, 24 * MiB), (100 * MiB, 8 * MiB)])
    target = plane.root / "target.img"
    subprocess.run(["cp", "--sparse=always", str(src), str(target)], check=True)
    changed = [(3 * MiB + 4096, 4096), (100 * MiB, 8192), (200 * MiB, 4096)]
    with open(src, "r+b") as f:
        for off, length in changed:
            f.seek(off)
            f.write(os.urandom(length))
    changed_bytes = sum(length for _, length in changed)
    agent, _ps, mt = start_plane(plane, src, size, mode="delta")
    wait_replicated(agent, mt, "p1")  # type: ignore[arg-type]
    assert compare(src, target).returncode == 0
    sent = int(pair_stats(agent, "p1")["bytes_sent"])  # type: ignore[call-overload]
    assert sent < 2 * changed_bytes, f"{sent} bytes sent for {changed_bytes} changed"
