"""The configuration server's DR jobs with an Azure fabric, the whole cycle: the real server, process
server, master target and lab agents as processes; the Azure fabric added with `fabrics add azure
--arm-endpoint --authority-host --blob-endpoint`, so the server drives the real Azure SDK against the
fake ARM process (tests/azure/fake_arm_server.py, managed disks as Azurite page blobs) and the master
target writes the replica page blobs into Azurite.

Enable refuses, all at once, what ARM would refuse at failover (AZ-*) with the other missing
prerequisites; enable fills the replica page blob through agent → process server → master target; a
planned failover drains, imports the blob as a managed disk and creates and starts the VM; the
managed disk read over its SAS equals the on-premises disk (`qemu-img compare`) and passes the lab's
oracle with every record the guest had flushed; commit; an unplanned failover refused on the core
quota, then run; the agentless way back (reprotect, failback, commit, re-protect), the lab's oracle
after each move.
"""

from __future__ import annotations

import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from azure.storage.blob import BlobClient

from siterecovery.api_client import ApiError
from siterecovery.dataplane.page_blob import CONNECTION_ENV, STORAGE_API_VERSION
from siterecovery.demo.cycle import Cycle
from siterecovery.demo.environment import Environment
from siterecovery.dr.azure_failback import FAULT_KILL_AT
from siterecovery.fabrics.azure import AzureFabric
from siterecovery.fabrics.azure_sdk import SdkArm, credential
from siterecovery.fabrics.base import PowerState
from siterecovery.fabrics.lab_build import create_lab
from siterecovery.lab.oracle import verify_image
from siterecovery.lab.records import RECORD_SIZE, encode_record
from tests.azure.conftest import ACCOUNT, Azurite, FakeArmEndpoint
from tests.azure.test_fabric import SUBNET
from tests.conftest import require_tool, run_cli, stop_environment
from tests.e2e.conftest import ensure_policy, run_job, wait_job

MiB = 1 << 20
MACHINE, OTHER = "web1", "db1"
KILL_FLAG = "kill-server-in-sync"
VNET = SUBNET.split("/subnets/")[0]
FAKE_ARM_CONNECTIONS = (f"to-onprem,NotConnected,{VNET}",)  # the site-to-site VPN is down (AZ-VPN)
FAKE_ARM_CORE_QUOTA = 3  # one Standard_D2s_v3 (2 cores) runs; a second is refused (AZ-QUOTA)


@pytest.fixture
def env(tmp_path: Path, azurite: Azurite, fake_arm_endpoint: FakeArmEndpoint) -> Iterator[Environment]:
    """The on-premises lab site with its process server, and the Azure site's master target."""
    e = Environment(
        tmp_path / "dr",
        disk_size=16 * MiB,
        env={
            "SITERECOVERY_HEARTBEAT_TIMEOUT": "6",
            "SITERECOVERY_SYNC_TIMEOUT": "120",
            "SITERECOVERY_DRAIN_TIMEOUT": "60",
            CONNECTION_ENV: azurite.connection_string,  # the Azure master target's storage account
            "REQUESTS_CA_BUNDLE": str(fake_arm_endpoint.ca_file),  # the server trusts the fake's CA
            FAULT_KILL_AT: f"azure-sync-written:{tmp_path / KILL_FLAG}",  # armed by the flag file
        },
    )
    e.root.mkdir(parents=True)
    try:
        create_lab(e.lab_dir, e.disk_size, e.guest, e.accel)
        e.start_server()
        e.passphrase_file.write_text(e.api.get("/api/server/passphrase")["passphrase"] + "\n")
        e.passphrase_file.chmod(0o600)
        connection = {"path": str(e.lab_dir), "site": "onprem"}
        e.api.post(
            "/api/fabrics", {"name": "onprem", "kind": "lab", "site": "onprem", "connection": connection}
        )
        e.lab_set("site", "onprem", f"control_server={e.url}", f"passphrase_file={e.passphrase_file}",
                  f"agent_registration_delay={e.registration_delay}")  # fmt: skip
        e.start_component("process-server", "ps-onprem", "onprem")
        yield e
    finally:
        stop_environment(e)


def add_azure(env: Environment, arm: FakeArmEndpoint, azurite: Azurite, name: str, *extra: str) -> str:
    """`fabrics add azure` toward the fake ARM; returns the replica container's name."""
    secret = env.root / f"{name}.secret"
    secret.write_text(arm.secret + "\n")
    container = f"replicas-{name}"
    run_cli("fabrics", "add", "azure", "--name", name,
            "--subscription", "00000000-0000-0000-0000-000000000000", "--resource-group", "rg-recovery",
            "--storage-account", ACCOUNT, "--location", "westeurope", "--subnet-id", SUBNET,
            "--tenant", arm.tenant, "--client-id", arm.client_id, "--client-secret-file", str(secret),
            "--arm-endpoint", arm.url, "--authority-host", arm.url,
            "--blob-endpoint", f"http://127.0.0.1:{azurite.port}/{ACCOUNT}",
            "--replica-container", container, *extra, env=env.cli_env)  # fmt: skip
    return container


def codes(problems: list[dict[str, Any]]) -> set[str]:
    return {str(p["code"]) for p in problems}


def succeeded(job: dict[str, Any]) -> dict[str, Any]:
    assert job["state"] == "succeeded", [
        (t["action"], t.get("error")) for t in job["tasks"] if t["state"] == "failed"
    ]
    return job


def result(job: dict[str, Any], action: str) -> dict[str, Any]:
    return next(job["result"][str(t["ordinal"])] for t in job["tasks"] if t["action"] == action)


def compare(a: Path, b: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [require_tool("qemu-img"), "compare", "-f", "raw", "-F", "raw", str(a), str(b)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def test_the_dr_cycle_through_the_jobs_with_an_azure_fabric_on_the_fake_arm(
    env: Environment, azurite: Azurite, fake_arm_endpoint: FakeArmEndpoint, tmp_path: Path
) -> None:
    arm_endpoint = fake_arm_endpoint
    container = add_azure(env, arm_endpoint, azurite, "azure")
    add_azure(env, arm_endpoint, azurite, "azure-tiny", "--vm-size", "Standard_Z99", "--sas-seconds", "10")
    fabrics = {f["name"]: f for f in env.api.get("/api/fabrics")}
    assert fabrics["azure"]["last_discovery_at"], fabrics["azure"]  # discovered through the fake ARM
    env.start_component(
        "master-target", "mt-azure", "cloud", "--os", "linux", "--page-blob-container", container
    )
    ensure_policy(env)

    # Refused at once, listing every failing rule: a VM size the region lacks (AZ-SIZE), a SAS
    # duration ARM would not grant (AZ-SAS) and, for a machine that is off, its agent (AG-1).
    body = {"machine": "db1", "policy": "gold", "process_server": "ps-onprem", "master_target": "mt-azure",
            "source_fabric": "onprem", "target_fabric": "azure-tiny"}  # fmt: skip
    with pytest.raises(ApiError) as refused:
        env.api.post("/api/replicatedItems", body)
    assert codes(refused.value.problems) == {
        "azure-vm-size-unavailable",
        "azure-sas-duration",
        "agent-not-registered",
    }
    assert env.api.get("/api/replicatedItems") == []
    # A region the subscription cannot create VMs in (ARM refuses the location): AZ-REGION.
    add_azure(env, arm_endpoint, azurite, "azure-atlantis", "--location", "atlantis")
    with pytest.raises(ApiError) as refused:
        env.api.post("/api/replicatedItems", {**body, "target_fabric": "azure-atlantis"})
    assert codes(refused.value.problems) == {"azure-region-unavailable", "agent-not-registered"}

    # Enable: the replica is a page blob in the fabric's container, filled through the real data path.
    for machine in (MACHINE, OTHER):
        env.fabric("onprem").power_on(machine)
    for machine in (MACHINE, OTHER):
        cycle = Cycle(env, machine)
        cycle.wait_agent("onprem")
        cycle.wait_records("onprem", 16)
    for machine in (OTHER, MACHINE):
        job = succeeded(
            run_job(env, "/api/replicatedItems", {**body, "machine": machine, "target_fabric": "azure"})
        )
        assert result(job, "replication-start")["sync_mode"] == "full"
    item = env.api.get(f"/api/replicatedItems/{MACHINE}")
    blob_url = f"http://127.0.0.1:{azurite.port}/{ACCOUNT}/{container}/{MACHINE}/"
    assert all(d["cloud_path"].startswith(blob_url) for d in item["details"]["disks"]), item["details"]
    assert result(job, "replication-sync")["bytes_sent"] > 0

    # A test failover needs recovery points a page-blob replica does not keep: refused, saying so.
    with pytest.raises(ApiError) as refused:
        env.api.post(f"/api/replicatedItems/{MACHINE}/failover", {"test": True, "point": "latest"})
    assert codes(refused.value.problems) == {"test-failover-unsupported"}

    # Planned failover: the source shuts down, the replica drains, managed disks come from the blobs.
    job = succeeded(run_job(env, f"/api/replicatedItems/{MACHINE}/failover", {"planned": True}))
    flushed = int(result(job, "shutdown-source")["source_flushed"])
    assert flushed >= 16
    fabric = AzureFabric(
        "azure", "cloud", sdk_arm(arm_endpoint), azurite.container("unused"), subnet_id=SUBNET
    )
    vm = fabric.discover().machine(MACHINE)
    assert vm is not None and vm.power_state is PowerState.ON and vm.origin.value == "failover"
    source = env.fabric("onprem").discover().machine(MACHINE)
    assert source is not None and source.power_state is PowerState.OFF
    snapshots = {s.name for s in fabric.arm.list_snapshots()}
    assert f"{MACHINE}-failover-base-os" in snapshots  # failback's base, taken before the VM existed
    assert f"{MACHINE}-siterecovery-before-commit-os" in snapshots  # the point can change until commit

    # The oracle: the managed disk, read over its SAS, equals the on-premises disk, and holds every
    # record the guest had flushed at shutdown.
    for disk, local in zip(vm.disks, source.disks, strict=True):
        copy = tmp_path / f"{disk.label}.raw"
        url = fabric.arm.disk_read_url(disk.label, 600)
        blob = BlobClient.from_blob_url(url, api_version=STORAGE_API_VERSION)
        # A managed disk reads as a fixed VHD: the disk's bytes, then the 512-byte footer.
        assert blob.get_blob_properties().size == local.size_bytes + 512
        assert blob.download_blob(offset=local.size_bytes, length=8).readall() == b"conectix"
        copy.write_bytes(blob.download_blob(offset=0, length=local.size_bytes).readall())
        fabric.arm.end_disk_read(disk.label)
        same = compare(Path(local.backing), copy)
        assert same.returncode == 0, same.stdout + same.stderr
    verdict_first = verify_image(str(tmp_path / f"{vm.disks[0].label}.raw"), MACHINE)
    assert verdict_first.ok and verdict_first.records >= flushed, verdict_first

    # Commit: the point is final, the snapshot before boot goes; the VM and failback's base stay.
    succeeded(run_job(env, f"/api/replicatedItems/{MACHINE}/commit", {}))
    assert env.api.get(f"/api/replicatedItems/{MACHINE}")["state"] == "failover-committed"
    snapshots = {s.name for s in fabric.arm.list_snapshots()}
    assert f"{MACHINE}-failover-base-os" in snapshots
    assert not any("before-commit" in s for s in snapshots), snapshots
    assert fabric.discover().machine(MACHINE) is not None

    # An unplanned failover of the second machine needs 4 cores of the quota's 3: refused before
    # anything stops or is made, and the item stays protected, so it can run again.
    job = run_job(env, f"/api/replicatedItems/{OTHER}/failover", {"planned": False})
    assert job["state"] == "failed"
    failed = [t for t in job["tasks"] if t["state"] == "failed"]
    assert [(t["action"], t["error"]["code"]) for t in failed] == [
        ("azure-failover-check", "azure-core-quota")
    ]
    assert env.api.get(f"/api/replicatedItems/{OTHER}")["state"] == "protected"
    assert not [d for d in fabric.arm.list_disks() if d.name.startswith(OTHER)]
    fabric.power_off(MACHINE)  # deallocated: its cores are free again
    job = succeeded(run_job(env, f"/api/replicatedItems/{OTHER}/failover", {"planned": False}))
    other = fabric.discover().machine(OTHER)
    assert other is not None and other.power_state is PowerState.ON
    copy = tmp_path / "other.raw"
    url = fabric.arm.disk_read_url(other.disks[0].label, 600)
    blob = BlobClient.from_blob_url(url, api_version=STORAGE_API_VERSION)
    copy.write_bytes(blob.download_blob(offset=0, length=other.disks[0].size_bytes).readall())
    fabric.arm.end_disk_read(other.disks[0].label)
    # The source still runs (unplanned): the replica is a clean prefix of its log.
    verdict = verify_image(str(copy), OTHER)
    assert verdict.ok and verdict.records >= 16, verdict
    succeeded(run_job(env, f"/api/replicatedItems/{OTHER}/commit", {}))

    # The way back, agentless (dr/azure_failback.py). The recovery VM runs and its guest appends
    # records to its log (written into the managed disk's page blob, as the VM would write it).
    fabric.power_off(OTHER)
    fabric.power_on(MACHINE)
    disk = azurite.container_client(fake_arm_endpoint.disks).get_blob_client(f"{MACHINE}-os")
    records = verdict_first.records
    append_records(disk, MACHINE, records, 8)
    onprem_disk = Path(source.disks[0].backing)
    body = {"master_target": "mt-azure", "process_server": "ps-onprem"}
    # Someone else is exporting the VM's disk (ActiveSAS): not ready, saying which (AZ-SAS-ACTIVE).
    os_disk = vm.disks[0].label
    fabric.arm.disk_read_url(os_disk, 600)
    answer = env.api.post(f"/api/replicatedItems/{MACHINE}/reprotect", {**body, "what_if": True})
    assert not answer["ready"] and codes(answer["problems"]) == {"azure-sas-active"}, answer
    assert os_disk in answer["problems"][0]["message"]
    fabric.arm.end_disk_read(os_disk)
    answer = env.api.post(f"/api/replicatedItems/{MACHINE}/reprotect", {**body, "what_if": True})
    assert answer["ready"], answer
    # Through an agent in the VM instead, the recovery network must route on-premises: its VPN
    # connection is down (AZ-VPN), listed with that path not being built; agentless needs neither.
    answer = env.api.post(
        f"/api/replicatedItems/{MACHINE}/reprotect", {**body, "agent": True, "what_if": True}
    )
    assert codes(answer["problems"]) == {"azure-onprem-unreachable", "azure-agent-failback-unsupported"}
    assert "to-onprem NotConnected" in answer["problems"][0]["message"], answer
    # The configuration server is killed with SIGKILL in the reprotect's sync, after the
    # on-premises disk was written and before its base moved (the fault hook); the VM writes on
    # meanwhile. Started again, the job resumes: the interrupted snapshot is completed, then the
    # sync goes on from it, so the on-premises disk ends equal to the VM's disk.
    (tmp_path / KILL_FLAG).touch()
    job_id = env.api.post(f"/api/replicatedItems/{MACHINE}/reprotect", body)["job_id"]
    server = env.procs["server"]
    assert server.wait(timeout=300) == -signal.SIGKILL, env.log_tail("server")
    assert not (tmp_path / KILL_FLAG).exists()  # the hook fired
    append_records(disk, MACHINE, records + 8, 3)
    env.stop_server(kill=True)  # already gone: forgets the process
    env.start_server()
    job = succeeded(wait_job(env, job_id, 300))
    assert next(t for t in job["tasks"] if t["action"] == "azure-sync")["attempts"] == 2
    sync = result(job, "azure-sync")
    interrupted = sync["resumed"]  # completed against the base snapshot taken before first boot
    assert interrupted.startswith(f"{MACHINE}-failback-sync-") and sync["base"] == interrupted, sync
    assert sync["snapshot"] != interrupted, sync
    # Only what changed moves: the 8 records since the failover's base (again), then the 3 since.
    assert 0 < sync["bytes_sent"] <= 11 * RECORD_SIZE, sync
    # The self-test through the fake ARM found Azurite's managed-disk diff inexact.
    assert sync["diff"] == "content-compare" and "no cleared range" in sync["diff_reason"], sync
    # Shown as an event by each server process that chose (the killed one, then its successor).
    shown = env.api.get("/api/events", code="azure-diff-method")
    assert shown and {e["message"] for e in shown} == {
        f"Fabric azure: failback finds changed ranges by content-compare ({sync['diff_reason']})."
    }, shown
    item = env.api.get(f"/api/replicatedItems/{MACHINE}")
    assert (item["state"], item["direction"]) == ("protected", "cloud-to-onprem")
    assert item["details"]["azure_pending"] == ""
    verdict = verify_image(str(onprem_disk), MACHINE)
    assert verdict.ok and verdict.records == records + 11, verdict
    # The on-premises disk (off) equals the Azure VM's disk byte for byte.
    azure_copy = tmp_path / "azure-os.raw"
    url = fabric.arm.disk_read_url(os_disk, 600)
    blob = BlobClient.from_blob_url(url, api_version=STORAGE_API_VERSION)
    azure_copy.write_bytes(blob.download_blob(offset=0, length=source.disks[0].size_bytes).readall())
    fabric.arm.end_disk_read(os_disk)
    same = compare(onprem_disk, azure_copy)
    assert same.returncode == 0, same.stdout + same.stderr

    # Failback: the VM is deallocated, the last differences move, the on-premises machine boots
    # and its guest's own start-up check passes with every record the VM wrote.
    append_records(disk, MACHINE, records + 11, 4)
    job = succeeded(run_job(env, f"/api/replicatedItems/{MACHINE}/failback", {"point": "latest"}))
    sync = result(job, "azure-sync")
    assert sync["base"].startswith(f"{MACHINE}-failback-sync-") and 0 < sync["bytes_sent"] <= 4 * RECORD_SIZE
    assert sync["resumed"] == "" and sync["diff"] == "content-compare", sync
    booted = result(job, "start-recovery-machine")["oracle"]
    assert booted["ok"] and booted["records"] == records + 15, booted
    vm = fabric.discover().machine(MACHINE)
    assert vm is not None and vm.power_state is PowerState.OFF
    succeeded(run_job(env, f"/api/replicatedItems/{MACHINE}/commit", {}))

    # Re-protect to Azure: the old recovery VM goes, the replica page blob is filled again.
    Cycle(env, MACHINE).wait_agent("onprem")
    job = succeeded(run_job(env, f"/api/replicatedItems/{MACHINE}/reprotect", body))
    assert result(job, "azure-retire-recovery-vm")["deleted"] == MACHINE
    assert result(job, "replication-start")["sync_mode"] == "full"
    assert fabric.discover().machine(MACHINE) is None
    assert not [s for s in fabric.arm.list_snapshots() if s.name.startswith(f"{MACHINE}-")]
    item = env.api.get(f"/api/replicatedItems/{MACHINE}")
    assert (item["state"], item["direction"]) == ("protected", "onprem-to-cloud")


def append_records(blob: BlobClient, machine: str, after: int, count: int) -> None:
    """The recovery VM's guest appends log records `after`+1 … `after`+`count` to its disk."""
    data = bytearray()
    for seq in range(after + 1, after + count + 1):
        buf = bytearray(RECORD_SIZE)
        encode_record(buf, seq, machine)
        data += buf
    blob.upload_page(bytes(data), offset=after * RECORD_SIZE, length=len(data))


def sdk_arm(arm: FakeArmEndpoint) -> SdkArm:
    cred = credential(arm.tenant, arm.client_id, arm.secret, arm.url)
    return SdkArm("00000000-0000-0000-0000-000000000000", "rg-recovery", "westeurope", ACCOUNT, cred, arm.url)
