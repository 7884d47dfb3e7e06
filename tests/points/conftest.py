"""Fixtures for recovery points end to end: a lab guest writing through a real agent → PS → MT.

The guest is the lab's self-verifying log writer; it runs under the lab's run-directory layout
(`lab/run/onprem/<machine>/guest.pid|guest.json`), and the agent gets the freeze and thaw hooks
that `runtime.agent_command` gives a lab machine's agent (`siterecovery lab quiesce|thaw`).
Desired states are the components' `--assignments` files, rewritten by the tests.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from siterecovery.fabrics.base import Disk, Machine, OsType, PowerState
from siterecovery.lab import runtime
from siterecovery.lab.guest import GuestState, read_status
from tests.dataplane.conftest import (
    Component,
    Plane,
    free_addresses,
    make_image,
    plane,  # noqa: F401 - the real data-plane processes (tests/dataplane's fixture)
    relay,
    replication,
    wait_for,
    wait_fresh_stats,
)

DISK = 16 << 20
MACHINE = "m1"
PAIR = "p1"
LABEL = "log"


def _start_time(pid: int) -> str:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat[stat.rindex(")") + 2 :].split()[19]


def lab_hooks(lab_dir: Path, source: Path) -> list[str]:
    """The freeze/thaw hook options a lab machine's agent gets (`runtime.agent_command`)."""
    machine = Machine(
        id="vm-1",
        name=MACHINE,
        bios_uuid="00000000-0000-0000-0000-000000000001",
        os_type=OsType.LINUX,
        os_version="lab",
        power_state=PowerState.ON,
        disks=(Disk(uuid="d-1", label=LABEL, size_bytes=DISK, backing=str(source)),),
    )
    settings = runtime.AgentSettings(site="onprem", server="https://config.invalid", passphrase_file="unused")
    cmd = runtime.agent_command(
        machine, runtime.run_dir(lab_dir, "onprem", MACHINE), settings, lab_dir=lab_dir
    )
    hooks: list[str] = []
    for option in ("--freeze-hook", "--thaw-hook"):
        hooks += [option, cmd[cmd.index(option) + 1]]
    return hooks


@dataclass
class Rig:
    plane: Plane
    source: Path
    target: Path
    lab_dir: Path
    ps: Component
    mt: Component
    agent: Component
    mt_desired: dict[str, Any] = field(default_factory=dict)
    agent_desired: dict[str, Any] = field(default_factory=dict)
    guest: subprocess.Popen[bytes] | None = None

    @property
    def run(self) -> Path:
        return runtime.run_dir(self.lab_dir, "onprem", MACHINE)

    # ---- desired state ---------------------------------------------------------------------------

    def set_mt(self, **changes: Any) -> None:
        self.mt_desired.update(changes)
        _write_json(self.plane.root / "mt-assignments.json", self.mt_desired)

    def set_agent(self, **changes: Any) -> None:
        self.agent_desired.update(changes)
        _write_json(self.plane.root / "agent-assignments.json", self.agent_desired)

    # ---- the guest -------------------------------------------------------------------------------

    def start_guest(self, rate: float = 150.0) -> None:
        self.run.mkdir(parents=True, exist_ok=True)
        sock = self.plane.root / "nbd" / f"{LABEL}.sock"
        wait_for(sock.exists, 30, "the agent's export")
        cmd = [
            sys.executable, "-m", "siterecovery.lab.guest",
            "--unix", str(self.plane.root / "nbd" / f"{LABEL}.sock"), "--export", LABEL,
            "--machine", MACHINE, "--status", str(self.run / runtime.GUEST_STATUS),
            "--rate", str(rate), "--flush-every", "4",
        ]  # fmt: skip
        with open(self.plane.root / "guest.log", "ab") as out:
            self.guest = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
        # The pid file the lab's quiesce/thaw commands find the guest by.
        (self.run / "guest.pid").write_text(f"{self.guest.pid} {_start_time(self.guest.pid)}")
        wait_for(lambda: self.guest_seq() > 0, 30, "the guest to write")

    def guest_seq(self) -> int:
        status = read_status(self.run / runtime.GUEST_STATUS)
        return status.seq if status is not None else 0

    def guest_state(self) -> GuestState | None:
        status = read_status(self.run / runtime.GUEST_STATUS)
        return status.state if status is not None else None

    def stop_guest(self) -> None:
        if self.guest is not None and self.guest.poll() is None:
            self.guest.send_signal(signal.SIGTERM)
            self.guest.wait(timeout=30)
        self.guest = None

    # ---- master target statistics ----------------------------------------------------------------

    def mt_pair(self) -> dict[str, Any]:
        for p in self.mt.stats().get("pairs", []):  # type: ignore[union-attr]
            if p["pair_id"] == PAIR:  # type: ignore[index]
                return dict(p)  # type: ignore[arg-type]
        return {}

    def points(self, kind: str | None = None) -> list[dict[str, Any]]:
        return [p for p in self.mt_pair().get("points", []) if kind is None or p["kind"] == kind]

    def copy(self, points: list[dict[str, Any]], tag: str) -> dict[str, Path]:
        """Materialise each point as a copy through the desired state; point id -> image."""
        out = {p["id"]: self.plane.root / "copies" / f"{tag}-{i}.img" for i, p in enumerate(points)}
        copies = [
            {"request_id": f"{tag}-{i}", "pair_id": PAIR, "point": pid, "out_path": str(path)}
            for i, (pid, path) in enumerate(out.items())
        ]
        self.set_mt(copies=self.mt_desired.get("copies", []) + copies)
        wanted = {c["request_id"] for c in copies}

        def done() -> bool:
            results = {c["request_id"]: c for c in self.mt.stats().get("copies_done", [])}  # type: ignore[union-attr]
            return wanted <= set(results)

        wait_for(done, 60, f"copies {sorted(wanted)}")
        results = {c["request_id"]: c for c in self.mt.stats()["copies_done"]}  # type: ignore[union-attr]
        failed = {r: results[r] for r in wanted if not results[r]["ok"]}
        assert not failed, failed
        return out

    def wait_applied(self) -> None:
        """Until the MT durably applied everything the agent captured (the guest is stopped)."""
        wait_fresh_stats(self.agent, self.mt)

        def caught_up() -> bool:
            pairs = self.agent.stats().get("pairs", [])
            agent = next((p for p in pairs if p["pair_id"] == PAIR), None)  # type: ignore[index]
            if agent is None or agent["state"] != "protected":  # type: ignore[index]
                return False
            captured = int(agent["captured_seq"])  # type: ignore[index]
            return (
                int(agent["acked_seq"]) >= captured and int(self.mt_pair().get("applied_seq", -1)) >= captured
            )  # type: ignore[index]

        wait_for(caught_up, 90, "the master target to apply everything captured")


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    tmp.replace(path)


def qemu_compare(a: Path, b: Path) -> int:
    """`qemu-img compare` exit code: 0 identical, 1 different."""
    proc = subprocess.run(
        ["qemu-img", "compare", "-f", "raw", "-F", "raw", str(a), str(b)], capture_output=True, timeout=60
    )
    assert proc.returncode in (0, 1), proc.stderr
    return proc.returncode


def build_rig(plane: Plane, *mt_extra: str) -> Rig:  # noqa: F811 - the imported fixture
    """PS, a journaled MT (retention volume `retention`, target disks in `targets`) and an agent."""
    root = plane.root
    source = make_image(root / "source.img", DISK)
    (root / "targets").mkdir()
    target = root / "targets" / f"{PAIR}.img"
    lab_dir = root / "lab"
    ps_addr, mt_addr = free_addresses(2)
    ps = plane.process_server(listen=ps_addr, relays=[relay(PAIR, "agent", mt_addr, "mt", DISK)]).start()
    mt = plane.master_target([], listen=mt_addr)
    mt.args += ["--volume", str(root / "targets"), *mt_extra]
    agent = plane.agent([], {LABEL: source}, "agent", *lab_hooks(lab_dir, source))
    rig = Rig(plane, source, target, lab_dir, ps, mt, agent)
    rig.set_mt(disks=[{"pair_id": PAIR, "path": str(target), "size": DISK, "process_server": "ps"}])
    rig.set_agent(replications=[replication(PAIR, LABEL, ps_addr, mt_addr)], crash_interval_seconds=0.5)
    mt.start()
    agent.start()
    ps.wait_address()
    mt.wait_address()
    return rig


@pytest.fixture
def rig(plane: Plane) -> Iterator[Rig]:  # noqa: F811 - the imported fixture
    r = build_rig(plane)
    try:
        yield r
    finally:
        r.stop_guest()
