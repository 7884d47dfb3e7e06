"""Test failover in an isolated network and unplanned failover onto libvirt, through the jobs.

A test failover defines a disposable domain from the recorded XML on the master target's copies
of the disks at the point, every interface (its MAC kept) on a libvirt network the job creates
with no forward and no addresses; replication goes on meanwhile, and the clean-up removes domain,
copies and network. An unplanned failover touches nothing of the source: here its agent is
killed with SIGKILL and its domain undefined, and the recovery domain runs from what the master
target had applied. Byte checks (`qemu-io` patterns) stand for the guest here; the VM guest's
oracle through the jobs is `test_vm_jobs.py`.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

import libvirt
from siterecovery.demo.environment import Environment
from tests.e2e.conftest import ensure_policy, run_job
from tests.libvirt.conftest import Sites
from tests.libvirt.daemon import PREFIX
from tests.libvirt.test_fabric import domain_xml, qemu_io
from tests.libvirt.test_jobs import (
    env,  # noqa: F401 - the configuration server, process server and kvm-b's master target
    has_pattern,
    nbd_write,
    result,
    start_agent,
    succeeded,
)

MiB = 1 << 20
APP = f"{PREFIX}modes"
APP_DR = f"{PREFIX}modes-dr"


def wait_pattern(path: str, command: str) -> None:
    deadline = time.monotonic() + 120
    while not has_pattern(path, command):
        assert time.monotonic() < deadline, f"{command} never reached {path}"
        time.sleep(0.5)


def test_test_failover_in_an_isolated_network_then_an_unplanned_failover(
    env: Environment,  # noqa: F811
    sites: Sites,
) -> None:
    pool_a, pool_b = f"{PREFIX}a", f"{PREFIX}b"
    fabric = sites.fabric()
    volume = fabric.create_volume(fabric.pool(pool_a), f"{APP}_vda.img", 8 * MiB, "raw")
    assert qemu_io("raw", volume, "write -P 0xaa 0 1M").returncode == 0
    disk = (
        f"<disk type='file' device='disk'><driver name='qemu' type='raw'/><source file='{volume}'/>"
        "<target dev='vda' bus='virtio'/></disk>"
    )
    fabric.define(domain_xml(APP, disk, sites.networks[0]))
    sock = start_agent(env, APP, volume)
    ensure_policy(env)
    body = {"machine": APP, "policy": "gold", "process_server": "ps-onprem", "master_target": "mt-kvm-b",
            "source_fabric": "kvm-a", "target_fabric": "kvm-b", "target_datastore": pool_b,
            "recovery_name": APP_DR}  # fmt: skip
    succeeded(run_job(env, "/api/replicatedItems", body))
    replica = str(sites.pools[pool_b] / f"{APP}_vda.img")
    nbd_write(sock, "write -P 0xb1 2M 256k")
    wait_pattern(replica, "read -P 0xb1 2M 256k")

    # Test failover at the latest point: a domain on the copies, alone on a network of its own.
    job = succeeded(run_job(env, f"/api/replicatedItems/{APP}/failover", {"test": True, "point": "latest"}))
    copies = result(job, "test-copy")["copies"]
    test_name = f"{APP}-test"
    inv = fabric.discover()
    tested = inv.machine(test_name)
    assert tested is not None and tested.power_state.value == "on"
    assert [d.backing for d in tested.disks] == copies and has_pattern(copies[0], "read -P 0xb1 2M 256k")
    network = f"{test_name}-isolated"
    assert [(n.mac, n.network) for n in tested.nics] == [("52:54:00:aa:bb:01", network)]
    assert any(n.name == network and n.active for n in inv.networks)
    conn = libvirt.open(sites.uri)
    try:
        net_xml = conn.networkLookupByName(network).XMLDesc(0)
    finally:
        conn.close()
    assert "<forward" not in net_xml and "<ip" not in net_xml, net_xml  # reaches nothing outside
    item = env.api.get(f"/api/replicatedItems/{APP}")
    assert item["state"] == "protected"  # the item itself is untouched

    # Replication goes on while the test domain runs: a new write reaches the replica, not the copy.
    nbd_write(sock, "write -P 0xb2 3M 256k")
    wait_pattern(replica, "read -P 0xb2 3M 256k")
    assert not has_pattern(copies[0], "read -P 0xb2 3M 256k")

    succeeded(run_job(env, f"/api/replicatedItems/{APP}/testCleanup", {}))
    inv = fabric.discover()
    assert inv.machine(test_name) is None and not any(n.name == network for n in inv.networks)
    assert not any(Path(c).exists() for c in copies)

    # Unplanned: the source is lost (agent killed, domain gone) after the master target applied
    # a last write; the recovery domain runs from the replica, which holds it.
    nbd_write(sock, "write -P 0xb3 4M 256k")
    wait_pattern(replica, "read -P 0xb3 4M 256k")
    env.procs["agent-onprem"].send_signal(signal.SIGKILL)
    fabric.delete_machine(APP)
    job = succeeded(run_job(env, f"/api/replicatedItems/{APP}/failover", {"planned": False}))
    assert "shutdown-source" not in [t["action"] for t in job["tasks"]]  # the source is not asked
    recovered = fabric.discover().machine(APP_DR)
    assert recovered is not None and recovered.power_state.value == "on"
    for command in ("read -P 0xb1 2M 256k", "read -P 0xb2 3M 256k", "read -P 0xb3 4M 256k"):
        assert has_pattern(replica, command), command
    succeeded(run_job(env, f"/api/replicatedItems/{APP}/commit", {}))
    assert env.api.get(f"/api/replicatedItems/{APP}")["state"] == "failover-committed"
