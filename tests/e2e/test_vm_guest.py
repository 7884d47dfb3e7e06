"""Real Linux VM guests (QEMU, KVM or TCG) through the DR cycle: their virtio disk is the agent's
NBD export, they keep fsync'd, checksummed files on ext4, and every verdict is the file system's
(e2fsck -fn) and the files' own. Marked `vm`; in CI a missing QEMU or kernel fails, never skips."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from siterecovery.demo.cycle import Cycle
from siterecovery.demo.environment import Environment
from siterecovery.fabrics.lab_model import GuestKind
from siterecovery.lab import runtime
from siterecovery.lab.vm.fs_oracle import needs_recovery, verify_fs_image
from tests.conftest import require_tool, run_cli, stop_environment
from tests.e2e.conftest import HEARTBEAT_TIMEOUT, run_job, task_result

pytestmark = pytest.mark.vm


@pytest.fixture(scope="module")
def vm_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Environment]:
    for tool in ("qemu-system-x86_64", "busybox", "e2fsck", "debugfs"):
        require_tool(tool)
    env = Environment(
        tmp_path_factory.mktemp("vm"),
        disk_size=64 << 20,  # ext4's smallest comfortable size
        guest=GuestKind.VM,
        env={"SITERECOVERY_HEARTBEAT_TIMEOUT": str(HEARTBEAT_TIMEOUT), "SITERECOVERY_SYNC_TIMEOUT": "120"},
    )
    try:
        # `lab image` builds the guest image on first use (and probes KVM once per kernel).
        image = json.loads(run_cli("--output", "json", "lab", "image", timeout=300).stdout)
        assert Path(image["folder"], "initrd.img").stat().st_size == image["initrd_bytes"]
        env.start()
        yield env
    finally:
        stop_environment(env)


def _points(env: Environment) -> list[dict[str, Any]]:
    return list(json.loads(run_cli("-o", "json", "points", "list", "web1", env=env.cli_env).stdout))


def test_whole_cycle_on_vm_guests_passes_the_file_system_oracle_after_every_move(vm_env: Environment) -> None:
    cycle = Cycle(vm_env, "web1", pace=0.25)  # a VM writes a few files a second under TCG
    cycle.run()
    moves = [r for r in cycle.rows if r.downtime is not None]
    assert [r.step for r in moves] == [
        "planned failover to cloud",
        "failback to on-premises",
        "change point before commit",
    ]
    for row in moves:
        assert row.oracle.startswith("pass"), row
        verdict = task_result(vm_env.api.get(f"/api/jobs/{row.job_id}"), "start-recovery-machine")["oracle"]
        fs = verdict["filesystem"]
        assert verdict["ok"] and fs["fsck_rc"] == 0, verdict  # e2fsck -fn after the journal replay
        # Planned moves shut the guest down cleanly (it unmounts): nothing is left in the journal.
        assert fs["clean_without_replay"] and not fs["needed_journal_replay"], verdict
        assert verdict["records"] > 0 and verdict["files"] == verdict["records"], verdict
    assert vm_env.api.get("/api/replicatedItems/web1")["state"] == "protected"


def test_app_consistent_point_of_a_vm_is_clean_without_journal_replay(vm_env: Environment) -> None:
    """The agent's freeze hook runs `fsfreeze --freeze` in the guest: the point taken while frozen
    passes e2fsck -fn as it is, before any mount replays a journal."""
    if vm_env.api.get("/api/replicatedItems/web1")["state"] != "protected":
        pytest.fail("runs after the cycle above, which leaves web1 protected")
    tag = json.loads(run_cli("-o", "json", "items", "bookmark", "web1", env=vm_env.cli_env).stdout)["tag"]
    deadline = time.monotonic() + 120
    while not any(p["id"] == tag and p["kind"] == "app" for p in _points(vm_env)):
        assert time.monotonic() < deadline, _points(vm_env)
        time.sleep(0.5)
    job = run_job(vm_env, "/api/replicatedItems/web1/failover", {"point": tag, "test": True})
    assert job["state"] == "succeeded", job
    verdict = task_result(job, "start-test-machine")["oracle"]
    fs = verdict["filesystem"]
    assert not fs["needed_journal_replay"] and fs["fsck_before_replay_rc"] == 0, verdict
    assert fs["clean_without_replay"] and verdict["ok"], verdict
    # The point ends exactly at the marker file the guest wrote before it froze.
    assert verdict["quiesce_markers"] and verdict["quiesce_markers"][-1] == verdict["records"], verdict
    assert run_job(vm_env, "/api/replicatedItems/web1/testCleanup", {})["state"] == "succeeded"


def test_kill9_of_qemu_loses_no_fsynced_file(vm_env: Environment) -> None:
    """kill -9 of QEMU mid-write: the disk left behind, checked from the host (journal replayed on
    a copy, e2fsck -fn, every file read out), is clean and holds every file the guest had
    reported fsync'd; so does the replica a failover boots (checked by the guest, the same way)."""
    if vm_env.api.get("/api/replicatedItems/web1")["state"] != "protected":
        pytest.fail("runs after the tests above, which leave web1 protected")
    lab, cycle = str(vm_env.lab_dir), Cycle(vm_env, "web1")
    cycle.wait_records("onprem", cycle._records("onprem") + 16)
    qemu = int((runtime.run_dir(vm_env.lab_dir, "onprem", "web1") / "qemu.pid").read_text().split()[0])
    run_cli("lab", "crash", lab, "web1")
    assert not runtime.guest_running(vm_env.lab_dir, "onprem", "web1")
    assert not Path(f"/proc/{qemu}").exists() or " Z " in Path(f"/proc/{qemu}/stat").read_text()
    status = runtime.guest_status(vm_env.lab_dir, "onprem", "web1")
    assert status is not None and status.flushed > 0

    machine = vm_env.fabric("onprem").discover().machine("web1")
    assert machine is not None
    disk = Path(machine.disks[0].backing)
    assert needs_recovery(disk)  # mounted when QEMU died: a crash-consistent disk
    verdict, fs = verify_fs_image(disk, "web1")
    assert fs.needed_replay and fs.fsck_rc == 0, fs
    assert verdict.ok and verdict.records >= status.flushed, (verdict, status)
    assert needs_recovery(disk)  # the replay ran on a copy: the disk itself is untouched
    shown = json.loads(run_cli("--output", "json", "lab", "verify", lab, "web1").stdout)
    assert shown["ok"] and shown["records"] == verdict.records, shown

    job = run_job(vm_env, "/api/replicatedItems/web1/failover", {"point": "latest", "planned": True})
    assert job["state"] == "succeeded", job
    booted = task_result(job, "start-recovery-machine")["oracle"]
    assert booted["filesystem"]["needed_journal_replay"], booted  # the replica of a crashed disk
    assert booted["filesystem"]["fsck_rc"] == 0 and booted["ok"], booted
    assert booted["records"] >= status.flushed, (booted, status)
