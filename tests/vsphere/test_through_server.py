"""Issue 7 through the configuration server, against govmomi's vcsim.

One real deployment for the module (the embedded lab, configuration server, process servers,
master targets and agents, as in tests/e2e) protects lab machine web1, fails it over and commits
it. The simulated vCenter is added with `siterecovery fabrics add vsphere` and discovered through
the server. A real master-target process runs for vcsim VM `mt-vc` (the server binds a master
target to the inventory machine of its name), so `reprotect --what-if --vcenter vc` — failing
back to an alternate vCenter (RP-VCENTER) — judges that vCenter, discovered live. Each case
changes the simulator through pyVmomi as an operator would break the rule, shows that the
what-if reports exactly that code and that the real reprotect refuses with it, then undoes the
change; the baseline is checked clean again so cases cannot lean on each other.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from pyVim.connect import Disconnect
from pyVim.task import WaitForTask
from pyVmomi import vim

from siterecovery.api_client import ApiError
from siterecovery.demo.environment import Environment
from siterecovery.fabrics.base import DiskSpec, MachineSpec, OsType
from tests.conftest import require_tool, run_cli, stop_environment
from tests.e2e.conftest import HEARTBEAT_TIMEOUT, fail_over_and_commit, run_job

from .conftest import Vcsim, find, reconfigure

VC = "vc"  # the vCenter fabric's name on the configuration server
MT = "mt-vc"  # the vcsim VM the master target runs on, and the component's name
HOST = "DC0_C0_H1"  # the master target's ESXi host
DS = "LocalDS_0"  # the model's VMFS datastore, mounted read/write on every host
RO_DS = "nfs-vc-ro"  # an NFS datastore mounted read-only on HOST
MACHINE = "web1"  # the lab machine protected, failed over and committed
LIMIT = 60  # MT-3: disks on one master target
NO_VMFS_HOST = "DC0_H1"  # the simulator's host without the shared VMFS datastore (vcsim/main.go)
NO_VMFS_DS = "nfs-novmfs"


@dataclass(frozen=True)
class Site:
    """The deployment, the simulator, an admin pyVmomi session and the master target's volume."""

    env: Environment
    vcsim: Vcsim
    si: Any
    retention_volume: str
    root: Path

    def vm(self, name: str) -> Any:
        return find(self.si, vim.VirtualMachine, name)

    def cli(self, *args: str, check: bool = True) -> Any:
        proc = run_cli("-o", "json", *args, env=self.env.cli_env, check=check)
        return json.loads(proc.stdout) if proc.stdout.strip() else None

    def password_file(self, user: str) -> Path:
        path = self.root / f"{user}.password"
        path.write_text(self.vcsim.password(user) + "\n")
        path.chmod(0o600)
        return path


@pytest.fixture(scope="module")
def site(vcsim: Vcsim, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    require_tool("qemu-img")
    root = tmp_path_factory.mktemp("through-server")
    env = Environment(
        root / "deployment",
        disk_size=16 << 20,
        env={
            "SITERECOVERY_HEARTBEAT_TIMEOUT": str(HEARTBEAT_TIMEOUT),
            "SITERECOVERY_SYNC_TIMEOUT": "120",
            "SITERECOVERY_DRAIN_TIMEOUT": "60",
        },
    )
    si = vcsim.service_instance()
    export = root / RO_DS
    export.mkdir()
    read_only = find(si, vim.HostSystem, HOST).configManager.datastoreSystem.CreateNasDatastore(
        vim.host.NasVolume.Specification(
            remoteHost="127.0.0.1",
            remotePath=str(export),
            localPath=str(export),
            accessMode="readOnly",
            type="NFS",
        )
    )
    try:
        with vcsim.fabric() as fabric:
            fabric.create_machine(
                MachineSpec(
                    name=MT,
                    host=HOST,
                    datastore=DS,
                    os_type=OsType.LINUX,
                    disks=(DiskSpec(label="os", size_bytes=16 << 20),),
                )
            )
            fabric.power_on(MT)
        _tools_status(find(si, vim.VirtualMachine, MT), "guestToolsRunning")  # open-vm-tools run on it
        env.start()
        volume = root / "mt-vc-retention"
        volume.mkdir()
        env.start_component("master-target", MT, "onprem", "--os", "linux", "--retention-volume", str(volume))
        made = Site(env, vcsim, si, "", root)
        made.cli(
            "fabrics", "add", "vsphere", "--name", VC, "--host", vcsim.host, "--port", str(vcsim.port),
            "--user", "admin", "--password-file", str(made.password_file("admin")), "--insecure",
        )  # fmt: skip
        fail_over_and_commit(env, MACHINE)
        yield Site(env, vcsim, si, env.retention_volume(MT), root)
    finally:
        stop_environment(env)
        with vcsim.fabric() as fabric:
            if fabric.discover().machine(MT) is not None:
                fabric.power_off(MT)
                fabric.delete_machine(MT)
        WaitForTask(read_only.Destroy_Task())
        Disconnect(si)


def reprotect_request(site: Site, **overrides: str) -> dict[str, Any]:
    body = {
        "master_target": MT,
        "process_server": "ps-cloud",
        "datastore": DS,
        "retention_volume": site.retention_volume,
        "vcenter": VC,
    }
    return {**body, **overrides}


def what_if(site: Site, **overrides: str) -> dict[str, Any]:
    out: dict[str, Any] = site.env.api.post(
        f"/api/replicatedItems/{MACHINE}/reprotect", {**reprotect_request(site, **overrides), "what_if": True}
    )
    return out


def codes(readiness: dict[str, Any]) -> list[str]:
    return [str(p["code"]) for p in readiness["problems"]]


# ---- discovery --------------------------------------------------------------------------------


def test_vcenter_discovered_through_server_and_cli(site: Site) -> None:
    shown = site.cli("fabrics", "show", VC)
    assert shown["kind"] == "vsphere" and not shown["discovery_error"] and shown["last_discovery_at"]
    assert shown["summary"]["hosts"] == 5 and shown["summary"]["datastores"] == 2
    assert shown["summary"]["warnings"] == []
    assert site.vcsim.password("admin") not in json.dumps(shown)  # stored encrypted, never shown
    assert VC in {f["name"] for f in site.cli("fabrics", "list")}

    machines = {m["name"]: m for m in site.cli("machines", "list", "--fabric", VC)}
    assert {MT, "DC0_H0_VM0", "DC0_C0_RP0_VM0"} <= set(machines)
    mt = machines[MT]
    assert mt["host"] == HOST and mt["os_type"] == "linux" and mt["tools_running"]
    assert [c["type"] for c in mt["controllers"]] == ["lsilogic"]
    assert [d["datastore"] for d in mt["disks"]] == [DS] and mt["extra_config"]["disk.EnableUUID"] == "TRUE"

    table = run_cli("machines", "list", "--fabric", VC, env=site.env.cli_env).stdout
    assert MT in table and "DC0_H0_VM0" in table

    # A machine created in vCenter appears once the server discovers again, not before. The
    # leader's periodic rediscovery may run in between: then, and only then, it may be listed.
    discovered_before = site.cli("fabrics", "show", VC)["last_discovery_at"]
    with site.vcsim.fabric() as fabric:
        fabric.create_machine(MachineSpec(name="appears", host=HOST, datastore=DS, os_type=OsType.LINUX))
        try:
            if "appears" in {m["name"] for m in site.cli("machines", "list", "--fabric", VC)}:
                assert site.cli("fabrics", "show", VC)["last_discovery_at"] > discovered_before
            assert site.cli("fabrics", "discover", VC)["summary"]["machines"] == len(machines) + 1
            assert "appears" in {m["name"] for m in site.cli("machines", "list", "--fabric", VC)}
        finally:
            fabric.delete_machine("appears")
    site.cli("fabrics", "discover", VC)


def test_healthy_vcenter_is_ready(site: Site) -> None:
    readiness = what_if(site)
    assert readiness["ready"] and readiness["problems"] == []
    # web1 does not exist in the alternate vCenter: reprotect would create it there (RPW-6).
    assert [n["kind"] for n in readiness["notes"]] == ["create-machine"]
    # Without --vcenter the site is the one where the master target's VM was discovered (the
    # vCenter), not the item's own on-premises site (the lab), where mt-vc has no VM.
    assert what_if(site, vcenter="") == readiness


def _session_keys(site: Site) -> set[str]:
    return {str(s.key) for s in site.si.content.sessionManager.sessionList}


def wait_no_session_but(site: Site, before: set[str]) -> None:
    """Until vCenter holds no session that was not open at `before`. The server's own periodic
    rediscovery (every DISCOVERY_EVERY monitor passes) logs in for a moment at any time, also
    when `before` was taken: a session it opened ends, one left open stays (vcsim never expires
    sessions), so the wait is bounded and compares sessions, not their number."""
    deadline = time.monotonic() + 60
    while opened := _session_keys(site) - before:
        assert time.monotonic() < deadline, f"vCenter sessions left open: {sorted(opened)}"
        time.sleep(0.2)


def test_server_logs_out_of_vcenter_after_each_discovery(site: Site) -> None:
    before = _session_keys(site)
    for _ in range(3):
        what_if(site)
    site.cli("fabrics", "discover", VC)
    wait_no_session_but(site, before)


# ---- each rule vCenter can show, broken through pyVmomi ---------------------------------------

Case = Callable[[Site], AbstractContextManager[dict[str, str]]]


def _spec(operation: str, device: Any, file_operation: str | None = None) -> Any:
    return vim.vm.device.VirtualDeviceSpec(operation=operation, device=device, fileOperation=file_operation)


def _devices(vm: Any, kind: Any) -> list[Any]:
    return [d for d in vm.config.hardware.device if isinstance(d, kind)]


def _swap_controller(vm: Any, kind: Any) -> None:
    """Replace the VM's SCSI controller by one of `kind` on the same key, keeping its disks."""
    (old,) = _devices(vm, vim.vm.device.VirtualSCSIController)
    new = kind(key=old.key, busNumber=old.busNumber, sharedBus="noSharing", device=old.device)
    reconfigure(vm, deviceChange=[_spec("remove", old), _spec("add", new)])


@contextmanager
def paravirtual_controller(site: Site) -> Iterator[dict[str, str]]:
    vm = site.vm(MT)
    _swap_controller(vm, vim.vm.device.ParaVirtualSCSIController)
    try:
        yield {}
    finally:
        _swap_controller(vm, vim.vm.device.VirtualLsiLogicController)


@contextmanager
def snapshot(site: Site) -> Iterator[dict[str, str]]:
    vm = site.vm(MT)
    WaitForTask(vm.CreateSnapshot_Task(name="before-patching", memory=False, quiesce=False))
    try:
        yield {}
    finally:
        WaitForTask(vm.RemoveAllSnapshots_Task())


def _extra_config(vm: Any, key: str, value: str) -> None:
    reconfigure(vm, extraConfig=[vim.option.OptionValue(key=key, value=value)])


def _tools_status(vm: Any, status: str) -> None:
    # vcsim's documented hook: an extraConfig key "SET.<property>" assigns that VM property.
    _extra_config(vm, "SET.guest.toolsRunningStatus", status)


@contextmanager
def enable_uuid_removed(site: Site) -> Iterator[dict[str, str]]:
    vm = site.vm(MT)
    _extra_config(vm, "disk.EnableUUID", "")  # an empty value removes the key, as in vSphere
    try:
        yield {}
    finally:
        _extra_config(vm, "disk.EnableUUID", "TRUE")


@contextmanager
def tools_stopped(site: Site) -> Iterator[dict[str, str]]:
    vm = site.vm(MT)
    _tools_status(vm, "guestToolsNotRunning")
    try:
        yield {}
    finally:
        _tools_status(vm, "guestToolsRunning")


@contextmanager
def free_licence(site: Site) -> Iterator[dict[str, str]]:
    host = find(site.si, vim.HostSystem, HOST)
    manager = site.si.content.licenseManager.licenseAssignmentManager
    manager.UpdateAssignedLicense(entity=host._moId, licenseKey=site.vcsim.licences["esxBasic"])
    try:
        yield {}
    finally:
        manager.UpdateAssignedLicense(entity=host._moId, licenseKey=site.vcsim.licences["eval"])


@contextmanager
def existing_machine(site: Site) -> Iterator[Any]:
    """web1 exists in the alternate vCenter too (on the master target's host): failback writes into it."""
    with site.vcsim.fabric() as fabric:
        fabric.create_machine(
            MachineSpec(
                name=MACHINE,
                host=HOST,
                datastore=DS,
                os_type=OsType.LINUX,
                disks=(DiskSpec(label="disk0", size_bytes=16 << 20),),
            )
        )
        try:
            yield site.vm(MACHINE)
        finally:
            fabric.delete_machine(MACHINE)


@contextmanager
def disk_on_read_only_datastore(site: Site) -> Iterator[dict[str, str]]:
    with existing_machine(site) as vm:
        datacenter = find(site.si, vim.Datacenter, "DC0")
        site.si.content.fileManager.MakeDirectory(
            name=f"[{RO_DS}] {MACHINE}", datacenter=datacenter, createParentDirectories=True
        )
        (controller,) = _devices(vm, vim.vm.device.VirtualSCSIController)
        data = vim.vm.device.VirtualDisk(
            key=-1,
            controllerKey=controller.key,
            unitNumber=1,
            capacityInKB=1024,
            backing=vim.vm.device.VirtualDisk.FlatVer2BackingInfo(
                fileName=f"[{RO_DS}] {MACHINE}/data.vmdk", diskMode="persistent", thinProvisioned=True
            ),
        )
        reconfigure(vm, deviceChange=[_spec("add", data, "create")])
        yield {}


@contextmanager
def datastore_read_only_for_new_machine(site: Site) -> Iterator[dict[str, str]]:
    yield {"datastore": RO_DS}


@contextmanager
def template_clone(site: Site) -> Iterator[dict[str, str]]:
    """Both made from one template: web1's disk carries the master target's disk UUID."""
    (mt_disk,) = _devices(site.vm(MT), vim.vm.device.VirtualDisk)
    with existing_machine(site) as vm:
        (disk,) = _devices(vm, vim.vm.device.VirtualDisk)
        disk.backing.uuid = mt_disk.backing.uuid.upper()  # vSphere shows UUIDs in either case
        reconfigure(vm, deviceChange=[_spec("edit", disk)])
        yield {}


@contextmanager
def sixty_disks(site: Site) -> Iterator[dict[str, str]]:
    """The master target's 4 controllers x 15 slots full: web1's one disk would be the 61st."""
    vm = site.vm(MT)
    (first,) = _devices(vm, vim.vm.device.VirtualSCSIController)
    controllers = [first.key] + [-100 - bus for bus in (1, 2, 3)]
    changes = [
        _spec("add", vim.vm.device.VirtualLsiLogicController(key=key, busNumber=bus, sharedBus="noSharing"))
        for bus, key in enumerate(controllers[1:], start=1)
    ]
    used = {d.unitNumber for d in _devices(vm, vim.vm.device.VirtualDisk)}
    # Unit 7 is the controller's own; explicit file names keep vcsim from logging a retry per disk.
    slots = [(c, u) for c in controllers for u in range(16) if u != 7 and not (c == first.key and u in used)]
    for n, (controller, unit) in enumerate(slots[: LIMIT - len(used)]):
        disk = vim.vm.device.VirtualDisk(
            key=-1000 - n,
            controllerKey=controller,
            unitNumber=unit,
            capacityInKB=1024,
            backing=vim.vm.device.VirtualDisk.FlatVer2BackingInfo(
                fileName=f"[{DS}] {MT}/slot-{n}.vmdk", diskMode="persistent", thinProvisioned=True
            ),
        )
        changes.append(_spec("add", disk, "create"))
    reconfigure(vm, deviceChange=changes)
    try:
        yield {}
    finally:
        added = [d for d in _devices(vm, vim.vm.device.VirtualDisk) if "/slot-" in d.backing.fileName]
        extra = [c for c in _devices(vm, vim.vm.device.VirtualSCSIController) if c.key != first.key]
        reconfigure(
            vm,
            deviceChange=[_spec("remove", d, "destroy") for d in added] + [_spec("remove", c) for c in extra],
        )


@contextmanager
def master_target_renamed(site: Site) -> Iterator[dict[str, str]]:
    vm = site.vm(MT)
    WaitForTask(vm.Rename_Task(newName=f"{MT}-renamed"))
    try:
        yield {}
    finally:
        WaitForTask(vm.Rename_Task(newName=MT))


@contextmanager
def host_without_vmfs(site: Site) -> Iterator[dict[str, str]]:
    """The master target moved (by an administrator) to DC0_H1, whose only datastore is NFS (RP-MT-VMFS)."""
    export = site.root / NO_VMFS_DS
    export.mkdir(exist_ok=True)
    bare = find(site.si, vim.HostSystem, NO_VMFS_HOST)
    nfs = next(
        (d for d in bare.datastore if d.name == NO_VMFS_DS), None
    ) or bare.configManager.datastoreSystem.CreateNasDatastore(
        vim.host.NasVolume.Specification(
            remoteHost="127.0.0.1",
            remotePath=str(export),
            localPath=str(export),
            accessMode="readWrite",
            type="NFS",
        )
    )
    vm, home = site.vm(MT), find(site.si, vim.HostSystem, HOST)
    shared = find(site.si, vim.Datastore, DS)
    WaitForTask(
        vm.RelocateVM_Task(vim.vm.RelocateSpec(host=bare, pool=bare.parent.resourcePool, datastore=nfs))
    )
    try:
        yield {"datastore": NO_VMFS_DS}  # a datastore the host has, so only the VMFS rule fails
    finally:
        WaitForTask(
            vm.RelocateVM_Task(
                vim.vm.RelocateSpec(host=home, pool=home.parent.resourcePool, datastore=shared)
            )
        )


@contextmanager
def unknown_vcenter(site: Site) -> Iterator[dict[str, str]]:
    yield {"vcenter": "vc-not-added"}


@pytest.mark.parametrize(
    ("case", "code", "names"),
    [
        pytest.param(paravirtual_controller, "mt-paravirtual-controller", MT, id="mt-paravirtual-controller"),
        pytest.param(snapshot, "mt-has-snapshots", "before-patching", id="mt-has-snapshots"),
        pytest.param(enable_uuid_removed, "mt-enableuuid-missing", MT, id="mt-enableuuid-missing"),
        pytest.param(tools_stopped, "mt-tools-missing", MT, id="mt-tools-missing"),
        pytest.param(free_licence, "host-free-edition", HOST, id="host-free-edition"),
        pytest.param(
            disk_on_read_only_datastore, "datastore-not-writable", RO_DS, id="datastore-not-writable"
        ),
        pytest.param(
            datastore_read_only_for_new_machine, "datastore-required", RO_DS, id="datastore-required"
        ),
        pytest.param(template_clone, "disk-uuid-clash", MACHINE, id="disk-uuid-clash"),
        pytest.param(sixty_disks, "mt-disk-limit", f"{LIMIT + 1} disks", id="mt-disk-limit"),
        pytest.param(master_target_renamed, "mt-not-discovered", MT, id="mt-not-discovered"),
        pytest.param(unknown_vcenter, "vcenter-not-discovered", "vc-not-added", id="vcenter-not-discovered"),
        pytest.param(host_without_vmfs, "mt-host-no-vmfs", NO_VMFS_HOST, id="mt-host-no-vmfs"),
    ],
)
def test_rule_seen_in_vcenter(site: Site, case: Case, code: str, names: str) -> None:
    path = f"/api/replicatedItems/{MACHINE}/reprotect"
    with case(site) as overrides:
        readiness = what_if(site, **overrides)
        assert codes(readiness) == [code], readiness["problems"]
        (problem,) = readiness["problems"]
        assert names in problem["message"] and problem["remediation"]
        with pytest.raises(ApiError) as refused:
            site.env.api.post(path, reprotect_request(site, **overrides))
        assert [p["code"] for p in refused.value.problems] == [code]
    item = site.env.api.get(f"/api/replicatedItems/{MACHINE}")
    assert item["state"] == "failover-committed"  # the refusal changed nothing
    assert what_if(site)["problems"] == []


# ---- RP-DATASTORES: a read-only account, then updated credentials ------------------------------


def test_read_only_account_until_credentials_updated(site: Site) -> None:
    added = site.cli(
        "fabrics", "add", "vsphere", "--name", "vc-ro", "--host", site.vcsim.host,
        "--port", str(site.vcsim.port), "--user", "readonly",
        "--password-file", str(site.password_file("readonly")), "--insecure",
    )  # fmt: skip
    assert added["summary"]["datastores"] == 0 and added["summary"]["warnings"]
    reprotect = (
        "items", "reprotect", MACHINE, "--master-target", MT, "--process-server", "ps-cloud",
        "--datastore", DS, "--retention-volume", site.retention_volume, "--vcenter", "vc-ro", "--what-if",
    )  # fmt: skip
    proc = run_cli("-o", "json", *reprotect, env=site.env.cli_env, check=False)
    assert proc.returncode == 1, proc.stderr
    readiness = json.loads(proc.stdout)
    # A read-only account also lacks the privileges (docs/prerequisites.md, RP-DATASTORES).
    assert codes(readiness) == ["datastores-not-visible", "vcenter-insufficient-privileges"]
    hidden = readiness["problems"][0]
    assert HOST in hidden["message"] and "Datastore.Browse" in hidden["detail"]["discovery"]
    assert hidden["remediation"].startswith("Update the credentials of vCenter vc-ro")
    assert hidden["remediation"].endswith("then retry.")

    updated = site.cli(
        "fabrics",
        "credentials",
        "vc-ro",
        "--user",
        "admin",
        "--password-file",
        str(site.password_file("admin")),
    )
    admin_view = site.cli("fabrics", "discover", VC)["summary"]["datastores"]  # what the admin account sees
    assert updated["connection"]["user"] == "admin" and updated["summary"]["datastores"] == admin_view
    retried = run_cli("-o", "json", *reprotect, env=site.env.cli_env)
    assert json.loads(retried.stdout)["problems"] == []


# ---- the alternate vCenter becomes the item's on-premises site ----------------------------------


def test_reprotect_to_alternate_vcenter_moves_the_item(site: Site) -> None:
    """A reprotect that passed against an alternate vCenter runs there, and failback will too.

    The job must write the machine's disks, which this product does on lab disks and not on
    vSphere datastores, so the alternate site here is the lab's on-premises site added a second
    time under another name.
    """
    env = site.env
    alternate = env.api.post(
        "/api/fabrics",
        {
            "name": "onprem-b",
            "kind": "lab",
            "site": "onprem",
            "connection": {"path": str(env.lab_dir), "site": "onprem"},
        },
    )
    fail_over_and_commit(env, "db1")
    original = env.api.get("/api/replicatedItems/db1")["details"]["onprem_fabric"]
    assert original != alternate["id"]
    body = {
        "master_target": "mt-linux",
        "process_server": "ps-cloud",
        "datastore": "ds-vmfs1",
        "retention_volume": env.retention_volume("mt-linux"),
        "vcenter": "onprem-b",
    }
    job = run_job(env, "/api/replicatedItems/db1/reprotect", body)
    assert job["state"] == "succeeded", job
    item = env.api.get("/api/replicatedItems/db1")
    assert (item["state"], item["direction"]) == ("protected", "cloud-to-onprem")
    assert item["details"]["onprem_fabric"] == alternate["id"]


def test_job_tasks_log_out_of_vcenter(site: Site) -> None:
    """Each job task that opens the vCenter (checks, power, snapshots, creating the machine,
    attaching its disks to the master target) logs out when it ends: vCenter caps an account's
    sessions and the server runs jobs for months. Runs last: it leaves the item reprotecting."""
    before = _session_keys(site)
    job_id = site.env.api.post(f"/api/replicatedItems/{MACHINE}/reprotect", reprotect_request(site))["job_id"]
    deadline = time.monotonic() + 120
    while True:
        job = site.env.api.get(f"/api/jobs/{job_id}")
        prepared = next(t for t in job["tasks"] if t["action"] == "prepare-onprem-disks")
        if prepared["state"] in ("succeeded", "failed") or job["state"] in ("failed", "succeeded"):
            break
        assert time.monotonic() < deadline, job
        time.sleep(0.2)
    assert prepared["state"] == "succeeded", prepared.get("error")
    assert site.vm(MACHINE) is not None  # RPW-6 created it there
    wait_no_session_but(site, before)
    site.env.api.post(f"/api/jobs/{job_id}/cancel")
