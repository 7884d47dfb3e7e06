"""Discovery against vcsim: the inventory, and each property changed through pyVmomi seen typed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pyVim.task import WaitForTask
from pyVmomi import vim

from siterecovery.fabrics.base import (
    REQUIRED_PRIVILEGES,
    DatastoreType,
    FabricError,
    HypervisorKind,
    LicenceEdition,
    MachineSpec,
    OsType,
    PowerState,
    ScsiType,
)
from siterecovery.fabrics.vsphere import VSphereFabric

from .conftest import Vcsim, find, nas_datastore, reconfigure


def test_discovers_model_inventory(vcsim: Vcsim) -> None:
    with vcsim.fabric() as fabric:
        inv = fabric.discover()
    assert {h.name for h in inv.hosts} >= {"DC0_H0", "DC0_C0_H0", "DC0_C0_H1", "DC0_C0_H2"}
    assert all(h.kind is HypervisorKind.ESXI and h.version.startswith("VMware ESXi") for h in inv.hosts)
    ds = inv.datastore("LocalDS_0")
    assert ds is not None and ds.type is DatastoreType.VMFS and ds.accessible and ds.capacity_bytes > 0
    # Mounted read/write on every host but DC0_H1, which the simulator keeps without VMFS (RP-MT-VMFS).
    assert all(ds.writable_on(h.name) for h in inv.hosts if h.name != "DC0_H1")
    assert not ds.mounted_on("DC0_H1")
    vm = inv.machine("DC0_H0_VM0")
    assert vm is not None and vm.host == "DC0_H0" and vm.power_state is PowerState.ON
    assert len(vm.bios_uuid) == 36 and vm.os_type is OsType.LINUX
    assert [c.type for c in vm.controllers] == [ScsiType.PVSCSI]
    (disk,) = vm.disks
    assert disk.backing == "[LocalDS_0] DC0_H0_VM0/disk1.vmdk" and disk.datastore == "LocalDS_0"
    assert (
        disk.size_bytes == 1 << 20 and len(disk.uuid) == 36 and disk.controller_key == vm.controllers[0].key
    )
    assert vm.nics and vm.nics[0].mac
    assert inv.missing_privileges() == () and not inv.warnings


def test_read_only_account_sees_no_datastores_until_credentials_change(vcsim: Vcsim) -> None:
    with vcsim.fabric("readonly") as fabric:
        inv = fabric.discover()
    assert inv.datastores == ()
    assert any("No datastores are visible" in w and "Datastore.Browse" in w for w in inv.warnings)
    assert "Datastore.Browse" in inv.missing_privileges() and "System.View" in inv.privileges
    with vcsim.fabric("admin") as fabric:
        inv = fabric.discover()
    assert inv.datastore("LocalDS_0") is not None and not inv.warnings
    assert set(REQUIRED_PRIVILEGES) <= inv.privileges


def test_read_only_account_is_refused_operations(vcsim: Vcsim) -> None:
    with vcsim.fabric("readonly") as fabric, pytest.raises(FabricError) as err:
        fabric.power_off("DC0_H0_VM1")
    assert err.value.code == "vcenter-insufficient-privileges"
    assert "VirtualMachine.Interact.PowerOff" in err.value.message


@pytest.mark.parametrize(
    ("user", "password", "code"),
    [
        pytest.param("admin", "wrong", "vcenter-login-failed", id="vcenter-login-failed"),
        pytest.param("nobody", "x", "vcenter-login-failed", id="vcenter-unknown-user"),
    ],
)
def test_bad_credentials(vcsim: Vcsim, user: str, password: str, code: str) -> None:
    with pytest.raises(FabricError) as err:
        VSphereFabric(vcsim.host, vcsim.port, user, password, insecure=True).discover()
    assert err.value.code == code and err.value.remediation


def test_untrusted_certificate_is_refused(vcsim: Vcsim) -> None:
    with pytest.raises(FabricError) as err:
        VSphereFabric(vcsim.host, vcsim.port, "admin", vcsim.password("admin")).discover()
    assert err.value.code == "vcenter-tls-untrusted"


@pytest.mark.parametrize("insecure", [True, False], ids=["insecure", "verified"])
def test_plain_http_port_is_said_to_not_speak_tls(insecure: bool) -> None:
    # A real HTTP server on loopback: before, this was "certificate not trusted, install a CA".
    import http.server
    import threading

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        with pytest.raises(FabricError) as err:
            VSphereFabric("127.0.0.1", httpd.server_address[1], "admin", "x", insecure=insecure).discover()
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert err.value.code == "vcenter-not-tls"
    assert "HTTPS port" in err.value.remediation and "CA" not in err.value.remediation


def test_unreachable_vcenter(vcsim: Vcsim) -> None:
    from tests.conftest import free_port

    with pytest.raises(FabricError) as err:
        VSphereFabric("127.0.0.1", free_port(), "admin", "x", insecure=True).discover()
    assert err.value.code == "vcenter-unreachable"


def test_unknown_datacenter(vcsim: Vcsim) -> None:
    with vcsim.fabric(datacenter="DC9") as fabric, pytest.raises(FabricError) as err:
        fabric.discover()
    assert err.value.code == "datacenter-not-found"


def test_paravirtual_controller_is_seen(vcsim: Vcsim, admin_si: Any, fresh_vm: str) -> None:
    with vcsim.fabric() as fabric:
        assert [c.type for c in fabric.discover().machine(fresh_vm).controllers] == [ScsiType.LSILOGIC]
        controller = vim.vm.device.ParaVirtualSCSIController(key=-5, busNumber=1, sharedBus="noSharing")
        reconfigure(
            find(admin_si, vim.VirtualMachine, fresh_vm),
            deviceChange=[vim.vm.device.VirtualDeviceSpec(operation="add", device=controller)],
        )
        types = [c.type for c in fabric.discover().machine(fresh_vm).controllers]
    assert sorted(types) == [ScsiType.LSILOGIC, ScsiType.PVSCSI]


def test_enable_uuid_set_and_removed(vcsim: Vcsim, admin_si: Any, fresh_vm: str) -> None:
    vm = find(admin_si, vim.VirtualMachine, fresh_vm)
    with vcsim.fabric() as fabric:
        assert fabric.discover().machine(fresh_vm).extra_config.get("disk.EnableUUID") == "TRUE"
        reconfigure(vm, extraConfig=[vim.option.OptionValue(key="disk.EnableUUID", value="")])
        assert "disk.EnableUUID" not in fabric.discover().machine(fresh_vm).extra_config
        reconfigure(vm, extraConfig=[vim.option.OptionValue(key="disk.EnableUUID", value="FALSE")])
        assert fabric.discover().machine(fresh_vm).extra_config["disk.EnableUUID"] == "FALSE"


def test_snapshots_seen_and_consolidated(vcsim: Vcsim, admin_si: Any, fresh_vm: str) -> None:
    vm = find(admin_si, vim.VirtualMachine, fresh_vm)
    WaitForTask(vm.CreateSnapshot_Task(name="before", memory=False, quiesce=False))
    WaitForTask(vm.CreateSnapshot_Task(name="after", memory=False, quiesce=False))
    with vcsim.fabric() as fabric:
        assert [s.name for s in fabric.discover().machine(fresh_vm).snapshots] == ["before", "after"]
        assert fabric.consolidate_snapshots(fresh_vm) == 2
        assert fabric.discover().machine(fresh_vm).snapshots == ()
        assert fabric.consolidate_snapshots(fresh_vm) == 0


def test_tools_running_status(vcsim: Vcsim, admin_si: Any, fresh_vm: str) -> None:
    vm = find(admin_si, vim.VirtualMachine, fresh_vm)
    with vcsim.fabric() as fabric:
        assert fabric.discover().machine(fresh_vm).tools_running is False
        # vcsim's documented hook: an extraConfig key "SET.<property>" assigns that VM property.
        reconfigure(
            vm,
            extraConfig=[
                vim.option.OptionValue(key="SET.guest.toolsRunningStatus", value="guestToolsRunning")
            ],
        )
        assert fabric.discover().machine(fresh_vm).tools_running is True


@pytest.mark.parametrize(
    ("edition", "expected"),
    [
        pytest.param("esxBasic", LicenceEdition.FREE, id="host-free-edition"),
        pytest.param("esxEnterprisePlus", LicenceEdition.ENTERPRISE, id="host-enterprise"),
        pytest.param("esxStandard", LicenceEdition.STANDARD, id="host-standard"),
        pytest.param("eval", LicenceEdition.EVALUATION, id="host-evaluation"),
    ],
)
def test_host_licence_edition(vcsim: Vcsim, admin_si: Any, edition: str, expected: LicenceEdition) -> None:
    host = find(admin_si, vim.HostSystem, "DC0_C0_H2")
    manager = admin_si.content.licenseManager.licenseAssignmentManager
    manager.UpdateAssignedLicense(entity=host._moId, licenseKey=vcsim.licences[edition])
    try:
        with vcsim.fabric() as fabric:
            inv = fabric.discover()
        assert inv.host("DC0_C0_H2").licence is expected
        assert inv.host("DC0_C0_H1").licence is LicenceEdition.EVALUATION
    finally:
        manager.UpdateAssignedLicense(entity=host._moId, licenseKey=vcsim.licences["eval"])


def test_nfs_datastore_mounted_read_only(vcsim: Vcsim, admin_si: Any, tmp_path: Path) -> None:
    export = tmp_path / "nfs-ro"
    with nas_datastore(admin_si, "DC0_C0_H0", export, access="readOnly"), vcsim.fabric() as fabric:
        found = fabric.discover().datastore("nfs-ro")
        assert found is not None and found.type is DatastoreType.NFS
        assert found.mounted_on("DC0_C0_H0") and not found.writable_on("DC0_C0_H0")
        with pytest.raises(FabricError) as err:
            fabric.create_machine(
                MachineSpec(name="on-ro", host="DC0_C0_H0", datastore="nfs-ro", os_type=OsType.LINUX)
            )
        assert err.value.code == "datastore-not-writable"


@pytest.mark.parametrize(
    ("summary_type", "expected"),
    [
        pytest.param("vsan", DatastoreType.VSAN, id="vsan"),
        pytest.param("VVOL", DatastoreType.VVOL, id="vvol"),
        pytest.param("PMEM", DatastoreType.OTHER, id="other"),
    ],
)
def test_datastores_neither_vmfs_nor_nfs_are_reported_as_what_they_are(
    vcsim: Vcsim, admin_si: Any, tmp_path: Path, summary_type: str, expected: DatastoreType
) -> None:
    # Dropping them made a host with only vSAN storage look empty, and the check then blamed credentials.
    export = tmp_path / f"ds-{summary_type.lower()}"
    with nas_datastore(admin_si, "DC0_C0_H0", export, kind=summary_type):
        with vcsim.fabric() as fabric:
            found = fabric.discover().datastore(export.name)
        assert found is not None and found.type is expected
        assert found.mounted_on("DC0_C0_H0")
