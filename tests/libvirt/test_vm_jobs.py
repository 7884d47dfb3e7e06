"""The whole DR cycle of a libvirt domain that boots a real guest, through the configuration
server's jobs, with the VM guest's file-system oracle after every move.

The domain boots the lab's VM guest image (TCG) with its disk on the agent's NBD export (capture,
option a of docs/libvirt.md); the guest writes fsync'd numbered files and, at each boot, checks its
disk (journal replay, `e2fsck -fn`, the files a clean prefix) and reports on its file console,
which the libvirt fabric reads as its `GuestOracle`: the failover and failback jobs record and
judge that verdict themselves (a planned move must lose no file the guest had flushed). Between
jobs the stopped disks are checked from the host with the lab's own oracle (`verify_fs_image`).

Enable → planned failover (the recovery domain on a qcow2 overlay over the replica volume) →
change point to an older crash point (overlay dropped, volume rolled back, new overlay, boot) →
commit (the overlay merged into the volume by a live block commit) → reprotect by delta onto the
original volume attached to the master target's domain → planned failback (the original domain
boots on its export) → commit → re-protect by delta.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from siterecovery.demo.environment import Environment
from siterecovery.lab.vm.fs_oracle import verify_fs_image
from tests.e2e.conftest import ensure_policy, run_job
from tests.libvirt.conftest import Sites
from tests.libvirt.daemon import PREFIX
from tests.libvirt.test_jobs import (
    backing_of,
    compare,
    env,  # noqa: F401 - the configuration server, process server and kvm-b's master target
    result,
    start_agent,
    start_mt_a,
    succeeded,
)
from tests.libvirt.test_vm_capture import guest, guest_xml, wait_console, wait_flushed

pytestmark = pytest.mark.vm
MiB = 1 << 20
WEB = f"{PREFIX}vmjob"
RECOVERY = f"{PREFIX}vmjob-dr"
JOB_TIMEOUT = 600.0  # a job that boots a TCG guest on two loaded cores


def oracle(job: dict[str, Any]) -> dict[str, Any]:
    verdict: dict[str, Any] = result(job, "start-recovery-machine")["oracle"]
    assert verdict["observable"] and verdict["ok"], verdict
    assert verdict["filesystem"]["fsck_rc"] == 0, verdict  # e2fsck -fn after the journal replay
    return verdict


def host_oracle(image: str, at_least: int) -> int:
    """The lab's host-side check of a stopped disk: journal replayed on a copy, e2fsck -fn, every
    file read and its hash checked; the files a clean prefix holding every flushed one."""
    verdict, fs = verify_fs_image(Path(image), WEB)
    assert verdict.ok and fs.clean and verdict.records >= at_least, (image, verdict.reason, at_least)
    return verdict.records


def wait_equal(a: str, b: str) -> None:
    deadline = time.monotonic() + 180
    while compare(a, b).returncode != 0:
        assert time.monotonic() < deadline, f"{a} and {b} still differ"
        time.sleep(1)


def test_vm_guest_cycle_through_the_jobs_passes_the_oracle_after_every_move(
    env: Environment,  # noqa: F811
    sites: Sites,
) -> None:
    kernel, initrd = guest(sites.folder)
    fabric = sites.fabric()
    pool_a, pool_b = f"{PREFIX}a", f"{PREFIX}b"
    volume = fabric.create_volume(fabric.pool(pool_a), f"{WEB}_vda.img", 48 * MiB, "raw")
    console = sites.folder / "vmjob-console.log"
    dr_console = sites.folder / f"{RECOVERY}.{console.name}"  # the recovery domain's own console
    fabric.define(guest_xml(WEB, kernel, initrd, volume, sites.networks[0], console))
    sock = start_agent(env, WEB, volume)
    ensure_policy(env)
    body = {"machine": WEB, "policy": "gold", "process_server": "ps-onprem", "master_target": "mt-kvm-b",
            "source_fabric": "kvm-a", "target_fabric": "kvm-b", "target_datastore": pool_b,
            "recovery_name": RECOVERY}  # fmt: skip
    job = succeeded(run_job(env, "/api/replicatedItems", body))
    replica = str(sites.pools[pool_b] / f"{WEB}_vda.img")

    # Capture: enable made the stopped domain's disk the agent's export at once; discovery still
    # names the disk by its volume. The guest makes its file system and writes.
    assert result(job, "capture-in-place")["at_once"] is True
    assert f"socket='{sock}'" in fabric.xml(WEB).replace('"', "'")
    assert [d.backing for d in fabric.discover().machine(WEB).disks] == [volume]  # type: ignore[union-attr]
    fabric.power_on(WEB)
    early = wait_flushed(console, 4)
    # A crash point taken after `early` files were flushed, then more files: an older point to
    # change to that holds fewer files than the failover's latest.
    since = time.time()
    points: list[dict[str, Any]] = []
    deadline = time.monotonic() + 180
    while not any(p["kind"] == "crash" and p["time"] > since for p in points):
        assert time.monotonic() < deadline, points
        time.sleep(1)
        points = env.api.get(f"/api/replicatedItems/{WEB}/recoveryPoints")
    wait_flushed(console, int(wait_console(console, r"SR FLUSHED (\d+)")[1]) + 16)

    # Planned failover: the source domain is stopped (hard), the drain waits for every write its
    # agent acknowledged, the recovery domain boots on an overlay over the replica and its guest
    # finds every file the source had flushed.
    job = succeeded(run_job(env, f"/api/replicatedItems/{WEB}/failover", {"planned": True}, JOB_TIMEOUT))
    flushed = int(result(job, "shutdown-source")["source_flushed"])
    first = oracle(job)
    down = {"failover": result(job, "start-recovery-machine")["downtime_seconds"]}
    assert first["records"] >= flushed > early, (first, flushed)
    recovered = fabric.discover().machine(RECOVERY)
    assert recovered is not None and [s.name for s in recovered.snapshots] == ["siterecovery-before-commit"]
    (overlay,) = [d.backing for d in recovered.disks]
    assert backing_of(overlay) == replica
    assert [n.mac for n in recovered.nics] == ["52:54:00:5e:00:07"]
    host_oracle(volume, flushed)  # the source's own disk, stopped
    wait_flushed(dr_console, first["records"] + 8)  # the recovery guest writes on its overlay

    # Change point before commit: to the older crash point. Everything the recovery domain wrote
    # is dropped with its overlay, the master target rolls the volume back, the guest boots on a
    # new overlay and finds a clean prefix of fewer files.
    points = env.api.get(f"/api/replicatedItems/{WEB}/recoveryPoints")
    older = min((p for p in points if p["kind"] == "crash" and p["time"] > since), key=lambda p: p["time"])
    job = succeeded(
        run_job(env, f"/api/replicatedItems/{WEB}/changePoint", {"point": older["id"]}, JOB_TIMEOUT)
    )
    second = oracle(job)
    assert early <= second["records"] < first["records"], (early, second, first)
    wait_flushed(dr_console, second["records"] + 8)

    # Commit: the overlay is merged into the replica volume while the guest runs; stopped, the
    # volume holds every file the guest had flushed.
    succeeded(run_job(env, f"/api/replicatedItems/{WEB}/commit", {}))
    recovered = fabric.discover().machine(RECOVERY)
    assert recovered is not None and recovered.snapshots == () and not Path(overlay).exists()
    assert [d.backing for d in recovered.disks] == [replica]
    fabric.power_off(RECOVERY)
    committed = int(wait_console(dr_console, r"SR FLUSHED (\d+)")[1])
    host_oracle(replica, committed)

    # The recovery domain is protected in turn: the reprotect makes its disk its own agent's
    # export (at once, it is stopped) and sends only the differences onto the original volume,
    # attached to kvm-a's master target domain; then it boots (its guest checks the merged
    # volume) and writes.
    cloud_sock = start_agent(env, RECOVERY, replica, site="cloud")
    back = start_mt_a(env, sites, f"{PREFIX}vmjob-mt")
    job = succeeded(run_job(env, f"/api/replicatedItems/{WEB}/reprotect", back, JOB_TIMEOUT))
    assert result(job, "capture-in-place")["at_once"] is True
    assert f"socket='{cloud_sock}'" in fabric.xml(RECOVERY).replace('"', "'")
    assert result(job, "prepare-onprem-disks")["created"] is False
    delta = int(result(job, "replication-sync")["bytes_sent"])
    assert 0 < delta < 16 * MiB, delta  # the files since the older point, not the 48 MiB disk
    fabric.power_on(RECOVERY)  # QEMU starts its console file anew: the verdict is this boot's
    boot = wait_console(dr_console, r"SR VERDICT ok=(\d) records=(\d+)")
    assert boot[1] == "1" and int(boot[2]) >= committed, boot[0]
    wait_flushed(dr_console, int(boot[2]) + 16)

    # Planned failback: the recovery domain stops, the drain, the volume leaves the master target
    # and the original domain boots on its export; its guest finds every file flushed in the cloud.
    job = succeeded(run_job(env, f"/api/replicatedItems/{WEB}/failback", {"point": "latest"}, JOB_TIMEOUT))
    in_cloud = int(result(job, "shutdown-source")["source_flushed"])
    home = oracle(job)
    down["failback"] = result(job, "start-recovery-machine")["downtime_seconds"]
    assert home["records"] >= in_cloud > int(boot[2]), (home, in_cloud)
    succeeded(run_job(env, f"/api/replicatedItems/{WEB}/commit", {}))
    wait_flushed(console, home["records"] + 8)

    # Re-protect towards kvm-b: a delta onto the replica volume. Stopped, and once the agent has
    # sent its last writes, the replica equals the volume and holds every flushed file.
    again = {"master_target": "mt-kvm-b", "process_server": "ps-onprem", "datastore": pool_b,
             "retention_volume": env.retention_volume("mt-kvm-b")}  # fmt: skip
    job = succeeded(run_job(env, f"/api/replicatedItems/{WEB}/reprotect", again, JOB_TIMEOUT))
    resent = int(result(job, "replication-sync")["bytes_sent"])
    assert resent < 16 * MiB, resent
    item = env.api.get(f"/api/replicatedItems/{WEB}")
    assert (item["state"], item["direction"]) == ("protected", "onprem-to-cloud")
    fabric.power_off(WEB)
    last = int(wait_console(console, r"SR FLUSHED (\d+)")[1])
    wait_equal(volume, replica)
    host_oracle(replica, last)
    print(
        f"vm cycle: flushed {flushed} → failover {first['records']}, older point {second['records']}, "
        f"committed {committed}, reprotect delta {delta} B, failback {home['records']}, "
        f"re-protect {resent} B, downtime {down}"
    )
