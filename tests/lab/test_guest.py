"""Lab machines: the guest writes its log through the export; crashes leave a clean prefix."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest

from siterecovery.dataplane.nbd_client import NbdClient
from siterecovery.fabrics.base import DiskSpec, MachineSpec, OsType, PowerState
from siterecovery.lab import runtime, verify_image, verify_log
from siterecovery.lab.records import RECORD_SIZE, RecordKind, check_record
from tests.conftest import require_tool

from .conftest import DISK_SIZE, Lab, wait_for, wait_records


def test_guest_writes_through_the_export(lab: Lab) -> None:
    lab.cli("set", str(lab.path), "machine", "web1", "guest_rate=0")
    lab.cli("power", str(lab.path), "web1", "on")
    web1 = lab.fabric().discover().machine("web1")
    assert web1 is not None and web1.power_state is PowerState.ON
    status = wait_records(lab, "web1", 64)
    assert status.start_verdict["reason"] == "empty log"
    sock = runtime.agent_socket(lab.fabric().run_dir("web1"), "disk0")
    # A real NBD peer sees the export the guest writes to.
    nbdinfo = require_tool("nbdinfo")
    info = json.loads(
        subprocess.run(
            [nbdinfo, "--json", f"nbd+unix:///disk0?socket={sock}"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )
    assert info["exports"][0]["export-size"] == web1.disks[0].size_bytes
    with NbdClient.connect("disk0", unix=sock) as client:
        fault, kind = check_record(client.pread(RECORD_SIZE, 0), 1, web1.name)
    assert fault is None and kind is RecordKind.DATA
    lab.cli("power", str(lab.path), "web1", "off")
    assert not runtime.export_running(lab.path, "onprem", "web1")
    final = runtime.guest_status(lab.path, "onprem", "web1")
    assert final is not None and final.state.value in ("stopped", "full")
    verdict = verify_image(web1.disks[0].backing, web1.name)
    assert verdict.ok and verdict.records == final.seq >= status.flushed


def test_kill_9_then_restart_keeps_a_clean_prefix(lab: Lab) -> None:
    # 200 records/s leaves ~20 s before the 16 MiB disk is full: a loaded machine once crashed it
    # only after the guest had filled it, and then waited for ever for 50 more records.
    lab.cli("set", str(lab.path), "machine", "db1", "guest_rate=200")
    lab.cli("power", str(lab.path), "db1", "on")
    wait_records(lab, "db1", 100)
    lab.cli("crash", str(lab.path), "db1")
    assert not runtime.guest_running(lab.path, "onprem", "db1")
    verify = lab.cli("verify", str(lab.path), "db1", "--output", "json")  # through the live export
    crashed = json.loads(verify.stdout)
    assert crashed["ok"] and crashed["records"] >= 100

    lab.cli("power", str(lab.path), "db1", "on")  # restarts the guest only
    slots = DISK_SIZE // RECORD_SIZE
    status = wait_records(lab, "db1", min(crashed["records"] + 50, slots))
    assert status.start_verdict["ok"] and status.start_verdict["records"] == crashed["records"]
    lab.cli("power", str(lab.path), "db1", "off")
    assert lab.cli("verify", str(lab.path), "db1").returncode == 0  # from the image file


def test_corrupted_record_fails_verification_and_is_named(lab: Lab) -> None:
    lab.cli("set", str(lab.path), "machine", "app1", "guest_rate=0")
    lab.cli("power", str(lab.path), "app1", "on")
    wait_records(lab, "app1", 40)
    lab.cli("power", str(lab.path), "app1", "off")
    app1 = lab.fabric().discover().machine("app1")
    assert app1 is not None
    with open(app1.disks[0].backing, "r+b") as image:
        os.pwrite(image.fileno(), b"\xff" * 16, 16 * RECORD_SIZE + 1000)  # inside record 17
    proc = lab.cli("verify", str(lab.path), "app1", check=False)
    assert proc.returncode == 1
    assert "record 17" in proc.stdout
    verdict = verify_image(app1.disks[0].backing, app1.name)
    assert not verdict.ok and verdict.first_bad == 17 and verdict.records == 16


def test_quiesce_writes_a_marker_and_pauses(lab: Lab) -> None:
    fabric = lab.fabric()
    lab.cli("set", str(lab.path), "machine", "web1", "guest_rate=500")
    fabric.power_on("web1")
    wait_records(lab, "web1", 10)
    marker = runtime.quiesce(lab.path, "onprem", "web1")
    web1 = fabric.discover().machine("web1")
    assert web1 is not None
    with NbdClient.connect("disk0", unix=runtime.agent_socket(fabric.run_dir("web1"), "disk0")) as client:
        verdict = verify_log(lambda off, n: client.pread(n, off), client.size, web1.name)
    assert verdict.ok and verdict.ends_quiesced and verdict.last_quiesce == marker  # nothing after it
    runtime.thaw(lab.path, "onprem", "web1")
    wait_records(lab, "web1", marker + 5)
    fabric.power_off("web1")
    verdict = verify_image(web1.disks[0].backing, web1.name)
    assert verdict.ok and verdict.quiesce_markers == (marker,) and verdict.records > marker


def test_dependent_guest_never_runs_ahead_of_its_peer(lab: Lab) -> None:
    fabric = lab.fabric()
    lab.cli("set", str(lab.path), "machine", "web1", "guest_rate=300")
    lab.cli("set", str(lab.path), "machine", "db1", "guest_rate=0", "guest_after=web1")
    fabric.power_on("web1")
    fabric.power_on("db1")
    wait_records(lab, "db1", 30)
    runtime.crash_guest(lab.path, "onprem", "web1")
    fabric.power_off("db1")
    inv = fabric.discover()
    web1, db1 = inv.machine("web1"), inv.machine("db1")
    assert web1 is not None and db1 is not None
    a = verify_image(web1.disks[0].backing, web1.name)
    b = verify_image(db1.disks[0].backing, db1.name)
    assert a.ok and b.ok and 30 <= b.records <= a.records


@pytest.mark.parametrize("machine", [pytest.param("mt-linux", id="master-target-has-no-guest")])
def test_machine_without_workload_starts_no_processes(lab: Lab, machine: str) -> None:
    lab.fabric().power_on(machine)
    wait_for("power state", lambda: lab.fabric().powered_on_at(machine) is not None)
    assert not runtime.export_running(lab.path, "onprem", machine)
    assert not runtime.guest_running(lab.path, "onprem", machine)


def test_failed_over_machine_continues_the_log_in_the_cloud(lab: Lab) -> None:
    onprem = lab.fabric()
    lab.cli("set", str(lab.path), "machine", "web1", "guest_rate=0")
    onprem.power_on("web1")
    wait_records(lab, "web1", 50)
    runtime.crash_guest(lab.path, "onprem", "web1")
    onprem.power_off("web1")
    web1 = onprem.discover().machine("web1")
    assert web1 is not None
    written = verify_image(web1.disks[0].backing, "web1").records
    copy = lab.path / "cloud/rg-recovery/web1/disk0.img"
    copy.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(web1.disks[0].backing, copy)  # the replicated disk, as failover finds it

    cloud = lab.fabric("cloud")
    cloud.create_machine(
        MachineSpec("web1", "", "rg-recovery", OsType.LINUX, disks=(DiskSpec("disk0", 0, backing=str(copy)),))
    )
    cloud.power_on("web1")
    status = wait_records(lab, "web1", written + 20, site="cloud")
    assert status.start_verdict["ok"] and status.start_verdict["records"] == written
    verify = lab.cli("verify", str(lab.path), "web1", "--site", "cloud", "--output", "json")
    assert json.loads(verify.stdout)["records"] >= written + 20
