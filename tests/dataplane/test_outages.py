"""Outages: kill -9 of a hop mid-stream, a corrupted link, and a spool that overflows."""

from __future__ import annotations

import contextlib
import os
import random
import signal
import socket
import subprocess
import threading
from pathlib import Path

import pytest
from tests.conftest import require_tool
from tests.dataplane.conftest import (
    Component,
    Plane,
    compare_raw,
    free_addresses,
    make_image,
    one_pair,
    pair_stats,
    relay,
    replication,
    wait_for,
    wait_replicated,
)

MiB = 1 << 20


def write_batch(sock: Path, rng: random.Random, count: int, size: int) -> None:
    cmds: list[str] = []
    for _ in range(count):
        off = rng.randrange(0, size // 65536) * 65536
        cmds += ["-c", f"write -P {rng.randrange(1, 255)} {off} 64k"]
    subprocess.run(
        [require_tool("qemu-io"), "-f", "raw", *cmds, "-c", "flush", f"nbd+unix:///d0?socket={sock}"],
        check=True,
        capture_output=True,
    )


@pytest.mark.parametrize("victim", [pytest.param("ps", id="ps-1-crash"), pytest.param("mt", id="mt-crash")])
def test_kill_9_mid_stream_loses_no_acknowledged_write(plane: Plane, victim: str) -> None:
    """PS-1 / MT-1: nothing acknowledged is lost when the process server or the master target dies."""
    size = 32 * MiB
    src = make_image(plane.root / "src.img", size, [(0, 4 * MiB, 0x42)])
    target = plane.root / "target.img"
    mt, ps, agent = one_pair(plane, src, target, size)
    sock = plane.root / "nbd" / "d0.sock"
    wait_for(sock.exists, 120, "the NBD export")
    rng = random.Random(7)
    hop: Component = ps if victim == "ps" else mt
    for i in range(12):
        write_batch(sock, rng, 16, size)
        if i == 3:
            hop.kill(signal.SIGKILL)
        if i == 7:
            hop.start()
    wait_replicated(agent, mt, "p1", timeout=120)
    assert compare_raw(src, target) == 0


class FlippingProxy:
    """Relays TCP both ways; flips one byte of the first connection's client→server stream."""

    def __init__(self, upstream: str, flip_at: int) -> None:
        self.upstream = upstream
        self.flip_at = flip_at
        self.flipped = False
        self.connections = 0
        self._srv = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self._srv.getsockname()[1]}"
        self._socks: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._srv.accept()
            except OSError:
                return
            host, port = self.upstream.rsplit(":", 1)
            server = socket.create_connection((host, int(port)))
            self._socks += [client, server]
            first = self.connections == 0
            self.connections += 1
            threading.Thread(target=self._pipe, args=(client, server, first), daemon=True).start()
            threading.Thread(target=self._pipe, args=(server, client, False), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, flip: bool) -> None:
        seen = 0
        try:
            while data := src.recv(65536):
                if flip and not self.flipped and seen + len(data) > self.flip_at:
                    buf = bytearray(data)
                    buf[self.flip_at - seen] ^= 0x01
                    data = bytes(buf)
                    self.flipped = True
                seen += len(data)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self._srv.close()
        for s in self._socks:
            s.close()


def test_flipped_byte_is_refused_and_data_still_arrives_correct(plane: Plane) -> None:
    size = 16 * MiB
    src = make_image(plane.root / "src.img", size)
    with open(src, "r+b") as f:
        f.write(os.urandom(6 * MiB))
    target = plane.root / "target.img"
    mt = plane.master_target([{"pair_id": "p1", "path": str(target), "size": size}]).start()
    mt_addr = mt.wait_address()
    ps = plane.process_server(relays=[relay("p1", "agent", mt_addr, "mt", size)]).start()
    proxy = FlippingProxy(ps.wait_address(), flip_at=3 * MiB)
    try:
        agent = plane.agent([replication("p1", "d0", proxy.address, mt_addr)], {"d0": src}).start()
        wait_replicated(agent, mt, "p1")
        assert proxy.flipped
        assert proxy.connections >= 2, "the sender did not reconnect and resend"
        assert compare_raw(src, target) == 0
    finally:
        proxy.close()


def test_spool_overflow_resyncs_only_dirty_blocks(plane: Plane) -> None:
    size = 32 * MiB
    src = make_image(plane.root / "src.img", size, [(0, 1 * MiB, 0x42)])
    target = plane.root / "target.img"
    [ps_addr] = free_addresses(1)
    mt = plane.master_target([{"pair_id": "p1", "path": str(target), "size": size}]).start()
    ps = plane.process_server(listen=ps_addr).start()
    ps.wait_address()
    agent = plane.agent(
        [replication("p1", "d0", ps_addr, mt.wait_address())],
        {"d0": src},
        "agent",
        "--spool-limit",
        str(256 * 1024),
    ).start()
    wait_replicated(agent, mt, "p1")
    ps.kill(signal.SIGKILL)
    sock = plane.root / "nbd" / "d0.sock"
    written = 0
    rng = random.Random(3)
    cmds: list[str] = []
    for _ in range(24):
        off = rng.randrange(0, size // 65536) * 65536
        pattern = plane.root / f"pat{off}"
        pattern.write_bytes(os.urandom(65536))
        cmds += ["-c", f"write -s {pattern} {off} 64k"]
        written += 65536
    subprocess.run(
        [require_tool("qemu-io"), "-f", "raw", *cmds, "-c", "flush", f"nbd+unix:///d0?socket={sock}"],
        check=True,
        capture_output=True,
    )
    wait_for(lambda: pair_stats(agent, "p1").get("state") == "resync-required", 30, "resync-required")
    before = int(pair_stats(agent, "p1")["bytes_sent"])  # type: ignore[call-overload]
    ps.start()
    wait_replicated(agent, mt, "p1", timeout=120)
    assert compare_raw(src, target) == 0
    sent = int(pair_stats(agent, "p1")["bytes_sent"]) - before  # type: ignore[call-overload]
    # The spool (≤ limit + one write) is resent, then only the dirty 64 KiB blocks.
    assert sent < 256 * 1024 + 65536 + written + 64 * 1024, f"{sent} bytes for {written} written"
