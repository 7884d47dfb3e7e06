"""A new lab's discovered inventory, and `lab set` edits seen by the next discovery."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable

import pytest

from siterecovery.fabrics.base import (
    REQUIRED_PRIVILEGES,
    CloudOrigin,
    DatastoreType,
    Fabric,
    FabricError,
    HypervisorKind,
    Inventory,
    IpMode,
    LicenceEdition,
    OsType,
    PowerState,
    ScsiType,
    SiteKind,
)

from .conftest import DISK_SIZE, Lab


def test_new_lab_discovers_every_object(lab: Lab) -> None:
    fabric = lab.fabric()
    assert isinstance(fabric, Fabric)
    inv = fabric.discover()
    assert inv.kind is SiteKind.VCENTER and not inv.warnings
    assert [(h.name, h.kind, h.licence) for h in inv.hosts] == [
        ("esx1", HypervisorKind.ESXI, LicenceEdition.ENTERPRISE),
        ("esx2", HypervisorKind.ESXI, LicenceEdition.ENTERPRISE),
    ]
    vmfs, nfs = inv.datastore("ds-vmfs1"), inv.datastore("ds-nfs1")
    assert vmfs is not None and vmfs.type is DatastoreType.VMFS
    assert nfs is not None and nfs.type is DatastoreType.NFS
    assert vmfs.writable_on("esx1") and vmfs.writable_on("esx2") and 0 < vmfs.free_bytes < vmfs.capacity_bytes
    assert inv.missing_privileges() == () and set(REQUIRED_PRIVILEGES) <= inv.privileges
    assert [m.name for m in inv.machines] == ["mt-linux", "mt-windows", "web1", "db1", "app1", "win1"]

    mt = inv.machine("mt-linux")
    assert mt is not None and mt.os_type is OsType.LINUX and mt.tools_running and not mt.on_lvm
    assert mt.extra_config["disk.EnableUUID"] == "TRUE" and mt.snapshots == ()
    assert [c.type for c in mt.controllers] == [ScsiType.LSILOGIC]
    assert [d.label for d in mt.disks] == ["disk0", "retention"]
    assert inv.machine("mt-windows") is not None and inv.machine("mt-windows").os_type is OsType.WINDOWS  # type: ignore[union-attr]
    assert inv.machine("win1").os_type is OsType.WINDOWS  # type: ignore[union-attr]
    for name in ("web1", "db1"):
        m = inv.machine(name)
        assert m is not None and m.nics[0].ip_mode is IpMode.STATIC and m.nics[0].address
        assert "NetworkManager" in m.packages
    uuids = [d.uuid for m in inv.machines for d in m.disks]
    assert len(set(uuids)) == len(uuids)
    assert len({m.bios_uuid for m in inv.machines}) == len(inv.machines)
    for m in inv.machines:
        assert m.power_state is PowerState.OFF
        for d in m.disks:
            assert d.backing.endswith(f"datastores/{d.datastore}/{m.name}/{d.label}.img")
            st = os.stat(d.backing)
            assert st.st_size == d.size_bytes == DISK_SIZE and st.st_blocks == 0  # sparse

    cloud = lab.fabric("cloud").discover()
    assert cloud.kind is SiteKind.CLOUD and cloud.machines == ()
    assert [(g.name, g.location) for g in cloud.resource_groups] == [("rg-recovery", "westeurope")]


def test_lab_create_refuses_existing_lab(lab: Lab) -> None:
    proc = lab.cli("create", str(lab.path), check=False)
    assert proc.returncode == 1 and "lab-exists" in proc.stderr


def _mt(inv: Inventory) -> object:
    return inv.machine("mt-linux")


# (lab set arguments, what the next discovery must show), one per rule the setting toggles.
SETTINGS: list[object] = [
    pytest.param(
        ["machine", "mt-linux", "scsi=pvscsi"],
        lambda inv: inv.machine("mt-linux").controllers[0].type is ScsiType.PVSCSI,
        id="mt-paravirtual-controller",
    ),
    pytest.param(
        ["machine", "mt-linux", "enableuuid=false"],
        lambda inv: inv.machine("mt-linux").extra_config["disk.EnableUUID"] == "FALSE",
        id="mt-enableuuid-missing",
    ),
    pytest.param(
        ["machine", "mt-linux", "tools=false"],
        lambda inv: not inv.machine("mt-linux").tools_running,
        id="mt-tools-missing",
    ),
    pytest.param(
        ["machine", "mt-linux", "snapshot+=snap1", "snapshot+=snap2"],
        lambda inv: [s.name for s in inv.machine("mt-linux").snapshots] == ["snap1", "snap2"],
        id="mt-has-snapshots",
    ),
    pytest.param(
        ["machine", "mt-linux", "os=windows"],
        lambda inv: inv.machine("mt-linux").os_type is OsType.WINDOWS,
        id="mt-os-mismatch",
    ),
    pytest.param(
        ["machine", "mt-linux", "lvm=true"], lambda inv: inv.machine("mt-linux").on_lvm, id="mt-on-lvm"
    ),
    pytest.param(
        ["host", "esx2", "licence=free"],
        lambda inv: inv.host("esx2").licence is LicenceEdition.FREE,
        id="host-free-edition",
    ),
    pytest.param(
        ["host", "esx2", "kind=hyperv"],
        lambda inv: inv.host("esx2").kind is HypervisorKind.HYPERV,
        id="target-not-esxi",
    ),
    pytest.param(
        ["datastore", "ds-vmfs1", "rw@esx1=false"],
        lambda inv: (
            not inv.datastore("ds-vmfs1").writable_on("esx1")
            and inv.datastore("ds-vmfs1").writable_on("esx2")
        ),
        id="datastore-not-writable",
    ),
    pytest.param(
        ["datastore", "ds-vmfs1", "type=nfs"],
        lambda inv: all(d.type is DatastoreType.NFS for d in inv.datastores),
        id="mt-host-no-vmfs",
    ),
    pytest.param(
        ["machine", "win1", "physical=true", "os_version=Windows Server 2008 R2 SP1"],
        lambda inv: (
            inv.machine("win1").physical and inv.machine("win1").os_version == "Windows Server 2008 R2 SP1"
        ),
        id="os-not-failback-capable",
    ),
    pytest.param(
        ["disk", "web1/disk0", "uuid=@mt-linux/disk0"],
        lambda inv: inv.machine("web1").disks[0].uuid == inv.machine("mt-linux").disks[0].uuid,
        id="disk-uuid-clash",
    ),
    pytest.param(
        ["machine", "mt-linux", "visible=false"],
        lambda inv: inv.machine("mt-linux") is None,
        id="mt-not-discovered",
    ),
    pytest.param(
        ["account", "full", "privileges-=VirtualMachine.Interact.PowerOn"],
        lambda inv: inv.missing_privileges() == ("VirtualMachine.Interact.PowerOn",) and inv.warnings,
        id="vcenter-insufficient-privileges",
    ),
    pytest.param(
        ["machine", "web1", "packages-=NetworkManager", "ip=dhcp"],
        lambda inv: (
            "NetworkManager" not in inv.machine("web1").packages
            and inv.machine("web1").nics[0].ip_mode is IpMode.DHCP
        ),
        id="fb-network",
    ),
    pytest.param(
        ["machine", "mt-linux", "disk+=extra1", "disk+=extra2:4M"],
        lambda inv: (
            [(d.label, d.size_bytes) for d in inv.machine("mt-linux").disks][2:]
            == [("extra1", DISK_SIZE), ("extra2", 4 << 20)]
            and os.path.exists(inv.machine("mt-linux").disks[3].backing)
        ),
        id="mt-disk-limit",
    ),
]


@pytest.mark.parametrize(("args", "seen"), SETTINGS)
def test_lab_set_is_seen_at_next_discovery(
    lab: Lab, args: list[str], seen: Callable[[Inventory], bool]
) -> None:
    fabric = lab.fabric()
    assert not seen(fabric.discover())
    lab.cli("set", str(lab.path), *args)
    assert seen(fabric.discover())


def test_lab_set_cloud_machine_origin(lab: Lab) -> None:
    from siterecovery.fabrics.base import MachineSpec

    cloud = lab.fabric("cloud")
    cloud.create_machine(MachineSpec(name="web1", host="", datastore="rg-recovery", os_type=OsType.LINUX))
    assert cloud.discover().machine("web1").origin is CloudOrigin.FAILOVER  # type: ignore[union-attr]
    lab.cli("set", str(lab.path), "site", "cloud", "resource_group+=rg-other")
    lab.cli(
        "set",
        str(lab.path),
        "--site",
        "cloud",
        "machine",
        "web1",
        "origin=migration",
        "resource_group=rg-other",
    )
    moved = cloud.discover().machine("web1")
    assert moved is not None and moved.origin is CloudOrigin.MIGRATION and moved.resource_group == "rg-other"


@pytest.mark.parametrize(
    ("args", "named"),
    [
        pytest.param(["machine", "mt-linux", "scsi=buslogic"], "lsilogic, pvscsi", id="bad-enum-value"),
        pytest.param(["machine", "mt-linux", "colour=red"], "enableuuid", id="unknown-key"),
        pytest.param(["machine", "mt-linux", "tools=maybe"], "true, false", id="bad-boolean"),
        pytest.param(["host", "esx2", "licence=gold"], "enterprise", id="bad-licence"),
        pytest.param(["datastore", "ds-vmfs1", "rw@esx9=false"], "rw@esx1", id="unknown-host-qualifier"),
        pytest.param(["account", "admin"], "readonly", id="unknown-account-mode"),
        pytest.param(["machine", "nosuch", "tools=false"], "mt-linux", id="unknown-machine"),
        pytest.param(["machine", "mt-linux", "tools=false", "scsi=bad"], "pvscsi", id="all-or-nothing"),
    ],
)
def test_lab_set_rejects_bad_input_and_changes_nothing(lab: Lab, args: list[str], named: str) -> None:
    before = (lab.path / "inventory.json").read_bytes()
    proc = lab.cli("set", str(lab.path), *args, check=False)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert named in " ".join(proc.stderr.split())
    assert (lab.path / "inventory.json").read_bytes() == before


def test_readonly_account_sees_no_datastores_until_restored(lab: Lab) -> None:
    fabric = lab.fabric()
    lab.cli("set", str(lab.path), "account", "readonly")
    inv = fabric.discover()
    assert inv.datastores == ()
    assert "System.View" in inv.privileges and "Datastore.Browse" in inv.missing_privileges()
    assert any("read-only" in w and "Datastore.Browse" in w for w in inv.warnings)
    with pytest.raises(FabricError) as refused:
        fabric.power_on("web1")
    assert refused.value.code == "vcenter-insufficient-privileges"
    lab.cli("set", str(lab.path), "account", "full")
    inv = fabric.discover()
    assert [d.name for d in inv.datastores] == ["ds-vmfs1", "ds-nfs1"] and not inv.warnings


def test_unreachable_site_fails_discovery(lab: Lab) -> None:
    lab.cli("set", str(lab.path), "site", "onprem", "reachable=false")
    with pytest.raises(FabricError) as refused:
        lab.fabric().discover()
    assert refused.value.code == "site-unreachable"
    lab.cli("set", str(lab.path), "site", "onprem", "reachable=true")
    assert lab.fabric().discover().hosts


def test_lab_show_tables_and_json(lab: Lab) -> None:
    table = lab.cli("show", str(lab.path)).stdout
    for name in ("esx1", "ds-vmfs1", "mt-linux", "win1", "rg-recovery"):
        assert name in table
    data = json.loads(lab.cli("show", str(lab.path), "--site", "onprem", "--output", "json").stdout)
    assert list(data["sites"]) == ["onprem"]
    assert [m["name"] for m in data["sites"]["onprem"]["machines"]][:2] == ["mt-linux", "mt-windows"]


def test_lab_show_at_80_columns_stacks_rows_instead_of_cutting_names(lab: Lab) -> None:
    # Before, every name was cut to `mt-…`, `we…` at 80 columns or when piped.
    narrow = lab.cli("show", str(lab.path), "--site", "onprem", columns=80).stdout
    assert "…" not in narrow
    assert max(len(line) for line in narrow.splitlines()) <= 80
    for kind, name in (("machine", "mt-linux"), ("machine", "web1"), ("datastore", "ds-vmfs1")):
        assert re.search(rf"^{kind} +{name} *$", narrow, re.M), name
    wide = lab.cli("show", str(lab.path), "--site", "onprem", columns=400).stdout
    assert not re.search(r"^machine +mt-linux", wide, re.M) and "│ mt-linux" in wide  # a table when it fits
