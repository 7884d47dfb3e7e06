"""The configuration server's DR jobs on two libvirt sites (two pools of one real libvirtd): enable
places the replica volume in the target pool and records the domain's XML; a planned failover
defines the recovery domain from that XML on the replica; commit; a reprotect onto the libvirt
site lists every failing libvirt prerequisite (LV-*) together with the other rules.

The real configuration server, process server, master target and agent run as processes
(demo.Environment); the domain's disk is written through the agent's NBD export, as QEMU writes
it once the domain's disk source is that export (docs/libvirt.md)."""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from siterecovery.api_client import ApiError
from siterecovery.demo.environment import Environment
from tests.conftest import require_tool, stop_environment
from tests.e2e.conftest import ensure_policy, run_job, wait_job
from tests.libvirt.conftest import Sites
from tests.libvirt.daemon import PREFIX
from tests.libvirt.test_fabric import domain_xml, qemu_io

MiB = 1 << 20
WEB = f"{PREFIX}jobweb"
RECOVERY = f"{PREFIX}jobweb-dr"


@pytest.fixture
def env(tmp_path: Path, sites: Sites) -> Iterator[Environment]:
    yield from environment(tmp_path, sites.uri, sites.uri)


def environment(tmp_path: Path, uri_a: str, uri_b: str) -> Iterator[Environment]:
    """The real configuration server with fabrics kvm-a (on-premises) and kvm-b (cloud) at those
    URIs, the process server ps-onprem and kvm-b's master target mt-kvm-b."""
    e = Environment(
        tmp_path / "cs", env={"SITERECOVERY_HEARTBEAT_TIMEOUT": "6", "SITERECOVERY_SYNC_TIMEOUT": "120"}
    )
    e.root.mkdir(parents=True)
    try:
        e.start_server()
        e.passphrase_file.write_text(e.api.get("/api/server/passphrase")["passphrase"] + "\n")
        e.passphrase_file.chmod(0o600)
        for name, site, uri in (("kvm-a", "onprem", uri_a), ("kvm-b", "cloud", uri_b)):
            e.api.post(
                "/api/fabrics",
                {
                    "name": name,
                    "kind": "libvirt",
                    "site": site,
                    "connection": {"uri": uri, "domain_type": "qemu"},
                },
            )
        (e.root / "retention").mkdir()
        e.spawn_component("process-server", "ps-onprem", "onprem")
        e.spawn_component("master-target", "mt-kvm-b", "cloud", "--os", "linux", "--retention-volume",
                          str(e.root / "retention"))  # fmt: skip
        e.await_connected("ps-onprem", "mt-kvm-b")
        yield e
    finally:
        stop_environment(e)


def _reported(env: Environment, name: str) -> bool:
    return any(s["name"] == name and s["stats"].get("exports") for s in env.api.get("/api/servers"))


def start_agent(env: Environment, machine: str, volume: str, site: str = "onprem", proc: str = "") -> Path:
    """The agent beside the protected domain, serving its volume as `vda` over a Unix socket; once
    it has reported what it serves (the jobs point the domain's disk at it)."""
    proc = proc or f"agent-{site}"
    run = env.root / proc
    run.mkdir()
    env._spawn(
        proc,
        "agent",
        "--machine", machine, "--site", site,
        "--server", env.url, "--passphrase-file", str(env.passphrase_file),
        "--state-dir", str(run / "state"), "--nbd-unix-dir", str(run / "nbd"),
        "--interval", "0.5", "--disk", f"vda={volume}",
        # The test's end stops the process server first: no 30 s wait to drain into nothing.
        "--drain-timeout", "2",
    )  # fmt: skip
    env._await(lambda: _reported(env, f"{site}/{machine}"), "agent")
    return run / "nbd" / "vda.sock"


def compare(a: str, b: str) -> subprocess.CompletedProcess[str]:
    # -U: the recovery domain's QEMU holds its volume's lock while it runs.
    return subprocess.run(
        [require_tool("qemu-img"), "compare", "-U", "-f", "raw", "-F", "raw", a, b],
        capture_output=True,
        text=True,
        timeout=60,
    )


def backing_of(image: str) -> str:
    info = subprocess.run(
        [require_tool("qemu-img"), "info", "-U", "--output=json", image],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    return str(json.loads(info.stdout).get("backing-filename", ""))


def codes(problems: list[dict[str, Any]]) -> set[str]:
    return {p["code"] for p in problems}


def pending_alerts(env: Environment, item_id: str) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = env.api.get(
        "/api/events", alerts="true", active="true", code="capture-pending", object_id=item_id
    )
    return found


def wait_for(condition: Any, what: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"no {what} in {timeout} s"
        time.sleep(0.5)


def test_enable_failover_commit_and_a_refused_reprotect_through_the_jobs(
    env: Environment, sites: Sites
) -> None:
    pool_a, pool_b = f"{PREFIX}a", f"{PREFIX}b"
    fabric = sites.fabric()
    volume = fabric.create_volume(fabric.pool(pool_a), f"{WEB}_vda.img", 8 * MiB, "raw")
    assert qemu_io("raw", volume, "write -P 0xaa 0 1M").returncode == 0  # before protection
    disk = (
        f"<disk type='file' device='disk'><driver name='qemu' type='raw'/><source file='{volume}'/>"
        "<target dev='vda' bus='virtio'/></disk>"
    )
    fabric.define(domain_xml(WEB, disk, sites.networks[0]))
    sock = start_agent(env, WEB, volume)
    ensure_policy(env)

    # Enable onto kvm-b: the replica is a volume in pool b, the domain's XML is recorded.
    body = {"machine": WEB, "policy": "gold", "process_server": "ps-onprem", "master_target": "mt-kvm-b",
            "source_fabric": "kvm-a", "target_fabric": "kvm-b", "target_datastore": pool_b,
            "recovery_name": RECOVERY}  # fmt: skip
    for pool, code in (("", "target-datastore-required"), (f"{PREFIX}nopool", "datastore-not-found")):
        with pytest.raises(ApiError) as refused:
            env.api.post("/api/replicatedItems", {**body, "target_datastore": pool})
        assert codes(refused.value.problems) == {code}
    # LV-CAPTURE: a domain whose agent does not serve its volume is refused before anything changes.
    stray = f"{WEB}-stray"
    stray_volume = fabric.create_volume(fabric.pool(pool_a), f"{stray}_vda.img", 1 * MiB, "raw")
    stray_xml = domain_xml(stray, disk.replace(volume, stray_volume), sites.networks[0])
    fabric.define(stray_xml.replace("aa:bb:01", "aa:bb:0c"))
    elsewhere = env.root / "elsewhere.img"
    elsewhere.write_bytes(bytes(1 * MiB))
    start_agent(env, stray, str(elsewhere), proc="agent-stray")
    with pytest.raises(ApiError) as refused:
        env.api.post("/api/replicatedItems", {**body, "machine": stray, "recovery_name": f"{stray}-dr"})
    (problem,) = refused.value.problems
    assert problem["code"] == "libvirt-capture-not-served" and problem["rule"] == "LV-CAPTURE", problem
    assert stray_volume in problem["message"] and f"--disk vda={stray_volume}" in problem["remediation"]
    assert f"file='{stray_volume}'" in fabric.xml(stray).replace('"', "'")  # left as it was

    job = run_job(env, "/api/replicatedItems", body)
    assert job["state"] == "succeeded", [
        (x["action"], x.get("error")) for x in job["tasks"] if x["state"] == "failed"
    ]
    # The job made the stopped domain's disk the agent's export (at once), before the initial
    # sync; discovery still names the disk by its volume.
    assert result(job, "capture-in-place")["at_once"] is True
    assert [t["action"] for t in job["tasks"]][:2] == ["capture-in-place", "replication-start"]
    assert f"socket='{sock}'" in fabric.xml(WEB).replace('"', "'")
    assert [d.backing for d in fabric.discover().machine(WEB).disks] == [volume]  # type: ignore[union-attr]
    item = env.api.get(f"/api/replicatedItems/{WEB}")
    replica = str(sites.pools[pool_b] / f"{WEB}_vda.img")
    assert [d["cloud_path"] for d in item["details"]["disks"]] == [replica]
    assert f"<name>{WEB}</name>" in item["details"]["domain_xml"]
    assert compare(volume, replica).returncode == 0  # the full sync

    # A write while protected (QEMU's write, through the agent's export) reaches the replica.
    nbd = f"nbd+unix:///vda?socket={sock}"
    written = subprocess.run(
        [require_tool("qemu-io"), "-f", "raw", "-c", "write -P 0xbb 3M 512k", nbd],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert written.returncode == 0, written.stderr

    # A planned failover drains it and defines the recovery domain from the recorded XML.
    job = run_job(env, f"/api/replicatedItems/{WEB}/failover", {"planned": True})
    assert job["state"] == "succeeded", [
        (x["action"], x.get("error")) for x in job["tasks"] if x["state"] == "failed"
    ]
    assert compare(volume, replica).returncode == 0
    for path in (volume, replica):  # the write is in both, so the compare above is not vacuous
        read = subprocess.run(
            [require_tool("qemu-io"), "-U", "-r", "-f", "raw", "-c", "read -P 0xbb 3M 512k", path],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert read.returncode == 0 and "Pattern verification failed" not in read.stdout, read.stdout
    recovered = fabric.discover().machine(RECOVERY)
    assert recovered is not None and recovered.power_state.value == "on"
    # Until commit the domain runs on a qcow2 overlay over the replica volume (its point can change).
    (overlay,) = [d.backing for d in recovered.disks]
    assert overlay.startswith(f"{replica}.") and overlay.endswith(".qcow2"), overlay
    assert [s.name for s in recovered.snapshots] == ["siterecovery-before-commit"]
    assert backing_of(overlay) == replica
    assert [n.mac for n in recovered.nics] == ["52:54:00:aa:bb:01"]  # the domain's own interface
    original = fabric.discover().machine(WEB)
    assert original is not None and recovered.bios_uuid != original.bios_uuid

    # Commit merges the overlay into the replica volume (a live block commit and pivot): the
    # running domain is on the volume again, the overlay is gone.
    job = run_job(env, f"/api/replicatedItems/{WEB}/commit", {})
    assert job["state"] == "succeeded", [
        (x["action"], x.get("error")) for x in job["tasks"] if x["state"] == "failed"
    ]
    assert env.api.get(f"/api/replicatedItems/{WEB}")["state"] == "failover-committed"
    recovered = fabric.discover().machine(RECOVERY)
    assert recovered is not None and recovered.power_state.value == "on" and recovered.snapshots == ()
    assert [d.backing for d in recovered.disks] == [replica] and not Path(overlay).exists()
    assert f"file='{replica}'" in fabric.xml(RECOVERY, inactive=False).replace('"', "'")

    # Back onto kvm-a: another domain took the protected domain's name, and the pool named does not
    # exist. The what-if lists both libvirt rules with the lab/vSphere ones (no master target on
    # kvm-a is registered), and the real reprotect is refused with the same list.
    fabric.delete_machine(WEB)
    fabric.define(domain_xml(WEB, "", sites.networks[0]))
    body = {"master_target": "mt-kvm-a", "process_server": "ps-onprem", "datastore": f"{PREFIX}nopool"}
    answer = env.api.post(f"/api/replicatedItems/{WEB}/reprotect", {**body, "what_if": True})
    found = codes(answer["problems"])
    assert not answer["ready"]
    assert {"libvirt-pool-unavailable", "libvirt-name-taken", "mt-not-discovered"} <= found, found
    with pytest.raises(ApiError) as exc:
        env.api.post(f"/api/replicatedItems/{WEB}/reprotect", body)
    assert codes(exc.value.problems) == found

    # With the name free again, pool a named and kvm-a's master target running, the deleted domain
    # is recreated from its recorded XML on a new raw volume in pool a, filled by a full sync from
    # the replica (which the recovery domain's agent serves).
    # The recovery domain (the new source) runs: the job changes its persistent definition and
    # waits, an alert on the item saying so, until a power cycle puts it on its agent's export.
    fabric.delete_machine(WEB)
    cloud_sock = start_agent(env, RECOVERY, replica, site="cloud")
    body = start_mt_a(env, sites, f"{PREFIX}mt-a1")
    job_id = env.api.post(f"/api/replicatedItems/{WEB}/reprotect", body)["job_id"]
    item_id = env.api.get(f"/api/replicatedItems/{WEB}")["id"]
    wait_for(lambda: pending_alerts(env, item_id), "the capture-pending alert")
    assert f"socket='{cloud_sock}'" not in fabric.xml(RECOVERY, inactive=False).replace('"', "'")
    assert env.api.get(f"/api/jobs/{job_id}")["state"] == "running"  # no sync before capture
    fabric.power_off(RECOVERY)
    fabric.power_on(RECOVERY)
    job = succeeded(wait_job(env, job_id))
    assert result(job, "capture-in-place")["at_once"] is False
    assert f"socket='{cloud_sock}'" in fabric.xml(RECOVERY, inactive=False).replace('"', "'")
    assert not pending_alerts(env, item_id)  # cleared once the domain ran on the export
    assert result(job, "prepare-onprem-disks")["created"] is True
    recreated = fabric.discover().machine(WEB)
    new_volume = str(sites.pools[pool_a] / f"{WEB}_vda.img")
    assert recreated is not None and [d.backing for d in recreated.disks] == [new_volume]
    # The step run again (a resumed job) reuses that volume rather than failing on it.
    assert fabric.ensure_volume(fabric.pool(pool_a), f"{WEB}_vda.img", 8 * MiB, "raw") == new_volume
    assert [n.mac for n in recreated.nics] == ["52:54:00:aa:bb:01"]  # from the recorded XML
    assert recreated.bios_uuid != original.bios_uuid  # a new domain, not the old definition
    assert result(job, "replication-sync")["bytes_sent"] > 0
    assert compare(new_volume, replica).returncode == 0


BACK = f"{PREFIX}jobback"
BACK_DR = f"{PREFIX}jobback-dr"
MT_A = f"{PREFIX}mt-a"


def succeeded(job: dict[str, Any]) -> dict[str, Any]:
    assert job["state"] == "succeeded", [
        (x["action"], x.get("error")) for x in job["tasks"] if x["state"] == "failed"
    ]
    return job


def result(job: dict[str, Any], action: str) -> dict[str, Any]:
    return next(job["result"][str(t["ordinal"])] for t in job["tasks"] if t["action"] == action)


def nbd_write(sock: Path, command: str) -> None:
    written = subprocess.run(
        [require_tool("qemu-io"), "-f", "raw", "-c", command, f"nbd+unix:///vda?socket={sock}"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert written.returncode == 0, written.stderr


def _has_retention(env: Environment, name: str) -> bool:
    try:
        return bool(env.retention_volume(name))
    except RuntimeError:
        return False


def start_mt_a(env: Environment, sites: Sites, domain: str) -> dict[str, Any]:
    """kvm-a's master target, running beside a domain of its own (each test its own: the libvirtd
    outlives a test); the body of a reprotect onto pool a through it."""
    sites.fabric().define(domain_xml(domain, "", sites.networks[0]).replace("aa:bb:01", "aa:bb:0a"))
    (env.root / "retention-a").mkdir()
    env.start_component("master-target", "mt-kvm-a", "onprem", "--os", "linux", "--machine", domain,
                        "--retention-volume", str(env.root / "retention-a"))  # fmt: skip
    env._await(lambda: _has_retention(env, "mt-kvm-a"), "mt-kvm-a")  # its first stats heartbeat
    return {"master_target": "mt-kvm-a", "process_server": "ps-onprem", "datastore": f"{PREFIX}a",
            "retention_volume": env.retention_volume("mt-kvm-a")}  # fmt: skip


def has_pattern(path: str, command: str) -> bool:
    read = subprocess.run(
        [require_tool("qemu-io"), "-U", "-r", "-f", "raw", "-c", command, path],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    return read.returncode == 0 and "Pattern verification failed" not in read.stdout


def test_reprotect_failback_and_reprotect_again_onto_libvirt_through_the_jobs(
    env: Environment, sites: Sites
) -> None:
    pool_a, pool_b = f"{PREFIX}a", f"{PREFIX}b"
    fabric = sites.fabric()
    volume = fabric.create_volume(fabric.pool(pool_a), f"{BACK}_vda.img", 8 * MiB, "raw")
    assert qemu_io("raw", volume, "write -P 0xaa 0 1M").returncode == 0
    disk = (
        f"<disk type='file' device='disk'><driver name='qemu' type='raw'/><source file='{volume}'/>"
        "<target dev='vda' bus='virtio'/></disk>"
    )
    fabric.define(domain_xml(BACK, disk, sites.networks[0]))
    start_agent(env, BACK, volume)
    ensure_policy(env)
    body = {"machine": BACK, "policy": "gold", "process_server": "ps-onprem", "master_target": "mt-kvm-b",
            "source_fabric": "kvm-a", "target_fabric": "kvm-b", "target_datastore": pool_b,
            "recovery_name": BACK_DR}  # fmt: skip
    succeeded(run_job(env, "/api/replicatedItems", body))
    replica = str(sites.pools[pool_b] / f"{BACK}_vda.img")
    succeeded(run_job(env, f"/api/replicatedItems/{BACK}/failover", {"planned": True}))
    succeeded(run_job(env, f"/api/replicatedItems/{BACK}/commit", {}))
    assert compare(volume, replica).returncode == 0

    # The recovery domain's writes while it runs in the cloud: through its own agent's export.
    cloud_sock = start_agent(env, BACK_DR, replica, site="cloud")
    noise = env.root / "noise"  # incompressible, so the bytes sent measure the delta
    noise.write_bytes(os.urandom(256 * 1024))
    nbd_write(cloud_sock, f"write -s {noise} 5M 256k")
    assert compare(volume, replica).returncode == 1  # they differ now

    # The master target of kvm-a is a domain of its own; the original domain's volume is attached
    # to it for the reprotect and detached again at failback. The recovery domain is stopped, so
    # the reprotect makes its disk the cloud agent's export at once.
    fabric.power_off(BACK_DR)
    back = start_mt_a(env, sites, MT_A)
    answer = env.api.post(f"/api/replicatedItems/{BACK}/reprotect", {**back, "what_if": True})
    assert answer["ready"], [(p["code"], p.get("rule"), p["message"][:150]) for p in answer["problems"]]
    job = succeeded(run_job(env, f"/api/replicatedItems/{BACK}/reprotect", back))
    prepared = result(job, "prepare-onprem-disks")
    assert prepared["created"] is False and len(prepared["attached"]) == 1
    mt = fabric.discover().machine(MT_A)
    assert mt is not None and [d.backing for d in mt.disks] == [volume]
    sync = result(job, "replication-sync")
    # A delta onto the original volume: the 256 KiB written in the cloud, not the 8 MiB disk.
    assert 256 * 1024 <= sync["bytes_sent"] < 1 * MiB, sync
    assert compare(volume, replica).returncode == 0
    item = env.api.get(f"/api/replicatedItems/{BACK}")
    assert (item["state"], item["direction"]) == ("protected", "cloud-to-onprem")

    # Failback (planned): a write while protected in the failback direction comes home, the volume
    # leaves the master target and the original domain boots on it.
    nbd_write(cloud_sock, "write -P 0xdd 6M 128k")
    succeeded(run_job(env, f"/api/replicatedItems/{BACK}/failback", {"point": "latest"}))
    assert compare(volume, replica).returncode == 0
    assert has_pattern(volume, "read -P 0xdd 6M 128k")
    assert Path(volume).read_bytes()[5 * MiB : 5 * MiB + 256 * 1024] == noise.read_bytes()
    inv = fabric.discover()
    original, mt, recovery = inv.machine(BACK), inv.machine(MT_A), inv.machine(BACK_DR)
    assert original is not None and original.power_state.value == "on"
    # Captured since enable, it boots on its agent's export (the volume under it).
    assert [d.backing for d in original.disks] == [volume]
    assert "socket=" in fabric.xml(BACK, inactive=False)
    assert [n.mac for n in original.nics] == ["52:54:00:aa:bb:01"]
    assert mt is not None and mt.disks == ()
    assert recovery is not None and recovery.power_state.value == "off"
    succeeded(run_job(env, f"/api/replicatedItems/{BACK}/commit", {}))
    original = fabric.discover().machine(BACK)
    assert original is not None and [d.backing for d in original.disks] == [volume]

    # Re-protect towards kvm-b again: a delta onto the replica volume, which holds it all already.
    again = {"master_target": "mt-kvm-b", "process_server": "ps-onprem", "datastore": pool_b,
             "retention_volume": env.retention_volume("mt-kvm-b")}  # fmt: skip
    job = succeeded(run_job(env, f"/api/replicatedItems/{BACK}/reprotect", again))
    assert result(job, "replication-sync")["bytes_sent"] < 256 * 1024
    assert compare(volume, replica).returncode == 0
    item = env.api.get(f"/api/replicatedItems/{BACK}")
    assert (item["state"], item["direction"]) == ("protected", "onprem-to-cloud")

    # Disable puts both domains back on their volumes: the stopped recovery domain at once, the
    # running original in its persistent definition (it runs on the export until its next power
    # cycle, which an event says).
    job = succeeded(run_job(env, f"/api/replicatedItems/{BACK}/disable", {}))
    releases = [job["result"][str(t["ordinal"])] for t in job["tasks"] if t["action"] == "capture-release"]
    released = {r["machine"]: r for r in releases}
    assert released[BACK]["released"] == {"vda": volume} and released[BACK]["at_once"] is False
    assert released[BACK_DR]["released"] == {"vda": replica} and released[BACK_DR]["at_once"] is True
    assert f"file='{volume}'" in fabric.xml(BACK).replace('"', "'")
    assert "socket=" in fabric.xml(BACK, inactive=False)  # until its next power cycle
    assert f"file='{replica}'" in fabric.xml(BACK_DR).replace('"', "'")
    assert env.api.get("/api/events", code="capture-release-pending", object_id=item["id"])
