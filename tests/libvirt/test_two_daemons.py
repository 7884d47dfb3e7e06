"""Two libvirt sites as two libvirtd instances (two URIs), through the configuration server's jobs.

Site a is the machine's libvirtd, site b a second one in a mount namespace of its own
(`daemon.py`); each has a pool and a network named alike on its own bridge. The protected domain
and its recovery domain share a name, each on its own host. Enable, planned failover, commit,
reprotect by delta onto the original volume, failback, commit, re-protect; then site a becomes
unreachable (its libvirtd stopped, the agent killed) and an unplanned failover brings the domain
up on site b from what its master target had applied. `qemu-img compare` and byte patterns after
each move (the VM guest's oracle through the jobs is `test_vm_jobs.py`).
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from siterecovery.demo.environment import Environment
from tests.e2e.conftest import ensure_policy, run_job
from tests.libvirt.conftest import TwoSites
from tests.libvirt.daemon import PREFIX
from tests.libvirt.test_fabric import domain_xml, qemu_io
from tests.libvirt.test_jobs import (
    backing_of,
    compare,
    environment,
    has_pattern,
    nbd_write,
    result,
    start_agent,
    start_mt_a,
    succeeded,
)
from tests.libvirt.test_modes import wait_pattern

MiB = 1 << 20
WEB = f"{PREFIX}two"


@pytest.fixture
def env(tmp_path: Path, two_sites: TwoSites) -> Iterator[Environment]:
    yield from environment(tmp_path, two_sites.a.uri, two_sites.b.uri)


def test_the_cycle_between_two_libvirtd_instances_then_an_unplanned_failover(
    env: Environment, two_sites: TwoSites
) -> None:
    a, b = two_sites.a.fabric(), two_sites.b.fabric()
    pool_a, pool_b = f"{PREFIX}a", f"{PREFIX}b"
    volume = a.create_volume(a.pool(pool_a), f"{WEB}_vda.img", 8 * MiB, "raw")
    assert qemu_io("raw", volume, "write -P 0xaa 0 1M").returncode == 0
    disk = (
        f"<disk type='file' device='disk'><driver name='qemu' type='raw'/><source file='{volume}'/>"
        "<target dev='vda' bus='virtio'/></disk>"
    )
    a.define(domain_xml(WEB, disk, two_sites.a.networks[0]))
    sock = start_agent(env, WEB, volume)
    ensure_policy(env)
    body = {"machine": WEB, "policy": "gold", "process_server": "ps-onprem", "master_target": "mt-kvm-b",
            "source_fabric": "kvm-a", "target_fabric": "kvm-b", "target_datastore": pool_b}  # fmt: skip
    job = succeeded(run_job(env, "/api/replicatedItems", body))
    assert result(job, "capture-in-place")["at_once"] is True  # the stopped domain, on the export
    assert f"socket='{sock}'" in a.xml(WEB).replace('"', "'")
    replica = str(two_sites.b.pools[pool_b] / f"{WEB}_vda.img")
    assert compare(volume, replica).returncode == 0
    nbd_write(sock, "write -P 0xbb 3M 512k")

    # Planned failover: the recovery domain is defined on host b under the same name.
    succeeded(run_job(env, f"/api/replicatedItems/{WEB}/failover", {"planned": True}))
    assert compare(volume, replica).returncode == 0 and has_pattern(replica, "read -P 0xbb 3M 512k")
    original, recovered = a.discover().machine(WEB), b.discover().machine(WEB)
    assert original is not None and original.power_state.value == "off"
    assert recovered is not None and recovered.power_state.value == "on"
    assert recovered.bios_uuid != original.bios_uuid
    assert backing_of(recovered.disks[0].backing) == replica  # its overlay until commit
    assert [(n.mac, n.network) for n in recovered.nics] == [("52:54:00:aa:bb:01", two_sites.b.networks[0])]
    succeeded(run_job(env, f"/api/replicatedItems/{WEB}/commit", {}))

    # Reprotect by delta onto the original volume, attached to kvm-a's master target domain; the
    # recovery domain, stopped, has its disk made the cloud agent's export by the job.
    b.power_off(WEB)
    cloud_sock = start_agent(env, WEB, replica, site="cloud")
    noise = env.root / "noise"
    noise.write_bytes(os.urandom(256 * 1024))
    nbd_write(cloud_sock, f"write -s {noise} 5M 256k")
    back = start_mt_a(env, two_sites.a, f"{PREFIX}two-mt")
    job = succeeded(run_job(env, f"/api/replicatedItems/{WEB}/reprotect", back))
    assert result(job, "capture-in-place")["at_once"] is True
    assert f"socket='{cloud_sock}'" in b.xml(WEB).replace('"', "'")
    sent = int(result(job, "replication-sync")["bytes_sent"])
    assert 256 * 1024 <= sent < 1 * MiB, sent
    assert compare(volume, replica).returncode == 0

    # Failback: home on host a, the recovery domain on host b stopped.
    nbd_write(cloud_sock, "write -P 0xdd 6M 128k")
    succeeded(run_job(env, f"/api/replicatedItems/{WEB}/failback", {"point": "latest"}))
    assert compare(volume, replica).returncode == 0 and has_pattern(volume, "read -P 0xdd 6M 128k")
    original, recovered = a.discover().machine(WEB), b.discover().machine(WEB)
    assert original is not None and original.power_state.value == "on"
    assert recovered is not None and recovered.power_state.value == "off"
    succeeded(run_job(env, f"/api/replicatedItems/{WEB}/commit", {}))
    again = {"master_target": "mt-kvm-b", "process_server": "ps-onprem", "datastore": pool_b,
             "retention_volume": env.retention_volume("mt-kvm-b")}  # fmt: skip
    job = succeeded(run_job(env, f"/api/replicatedItems/{WEB}/reprotect", again))
    resent = int(result(job, "replication-sync")["bytes_sent"])
    assert resent < 256 * 1024, resent
    assert compare(volume, replica).returncode == 0
    print(f"two libvirtd: reprotect delta {sent} B for 262,144 written, re-protect {resent} B")

    # Site a is lost: a last write reaches the replica, then its libvirtd stops (its domains with
    # it) and its agent is killed. The unplanned failover asks nothing of site a.
    nbd_write(sock, "write -P 0xee 7M 128k")
    wait_pattern(replica, "read -P 0xee 7M 128k")
    two_sites.a.daemon.stop()
    env.procs["agent-onprem"].send_signal(signal.SIGKILL)
    job = succeeded(run_job(env, f"/api/replicatedItems/{WEB}/failover", {"planned": False}))
    assert "shutdown-source" not in [t["action"] for t in job["tasks"]]
    recovered = b.discover().machine(WEB)
    assert recovered is not None and recovered.power_state.value == "on"
    assert has_pattern(replica, "read -P 0xee 7M 128k")
    succeeded(run_job(env, f"/api/replicatedItems/{WEB}/commit", {}))
    a.close()
    b.close()
