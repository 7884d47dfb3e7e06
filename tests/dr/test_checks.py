"""Every reprotect/failback prerequisite rule, one case each, against constructed inventories.

Each case starts from a healthy situation (ESXi host, VMFS datastore mounted read/write, a Linux
master target with LSI Logic, disk.EnableUUID, tools running), changes one fact, the way one
would edit a lab's inventory, and expects exactly that rule's code.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from siterecovery.dr.azure_checks import AZURE_AGENT_RULES, AZURE_FAILBACK_RULES, AZURE_FAILOVER_RULES
from siterecovery.dr.check_inputs import (
    ComponentView,
    GroupMember,
    ItemView,
    MasterTargetView,
    PlacedDisk,
    ReprotectContext,
    ReprotectRequest,
    RetentionVolumeView,
    Situation,
)
from siterecovery.dr.checks import (
    FAILBACK_RULES,
    REPROTECT_RULES,
    check_failback,
    check_reprotect,
    ensure_failback,
    ensure_reprotect,
)
from siterecovery.dr.libvirt_capture import CAPTURE_RULES
from siterecovery.dr.libvirt_checks import LIBVIRT_RULES
from siterecovery.dr.notes import TaskKind, plan_notes
from siterecovery.dr.ruledoc import documented_table, prerequisites_table
from siterecovery.dr.rules import MAX_MT_DISKS, RULES
from siterecovery.errors import SiteRecoveryError, Status
from siterecovery.fabrics.base import (
    REQUIRED_PRIVILEGES,
    CloudOrigin,
    Datastore,
    DatastoreMount,
    DatastoreType,
    Disk,
    Host,
    HypervisorKind,
    Inventory,
    LicenceEdition,
    Machine,
    OsType,
    PowerState,
    ResourceGroup,
    ScsiController,
    ScsiType,
    SiteKind,
    Snapshot,
)
from siterecovery.store.states import Direction, ProtectionState

ROOT = Path(__file__).resolve().parents[2]
GIB = 1 << 30


def _disk(uuid: str, label: str, datastore: str, path: str) -> Disk:
    return Disk(uuid, label, 16 * GIB, f"[{datastore}] {path}", datastore, 1000)


MT_VM = Machine(
    id="vm-10",
    name="mt-01",
    bios_uuid="4210aaaa-0000-0000-0000-000000000010",
    os_type=OsType.LINUX,
    os_version="Ubuntu 22.04",
    power_state=PowerState.ON,
    host="esx-01",
    tools_running=True,
    extra_config={"disk.EnableUUID": "TRUE"},
    controllers=(ScsiController(1000, ScsiType.LSILOGIC),),
    disks=(_disk("6000c290-mt00", "Hard disk 1", "vmfs-01", "mt-01/mt-01.vmdk"),),
)
WEB_VM = Machine(
    id="vm-20",
    name="web-01",
    bios_uuid="4210bbbb-0000-0000-0000-000000000020",
    os_type=OsType.LINUX,
    os_version="Ubuntu 22.04",
    power_state=PowerState.OFF,
    host="esx-02",
    disks=(
        _disk("6000c290-web0", "Hard disk 1", "vmfs-02", "web-01/web-01.vmdk"),
        _disk("6000c290-web1", "Hard disk 2", "vmfs-02", "web-01/web-01_1.vmdk"),
    ),
)
ONPREM = Inventory(
    site="vcenter-01",
    kind=SiteKind.VCENTER,
    discovered_at=1_700_000_000.0,
    hosts=(
        Host("host-1", "esx-01", HypervisorKind.ESXI, LicenceEdition.STANDARD, "7.0.3"),
        Host("host-2", "esx-02", HypervisorKind.ESXI, LicenceEdition.STANDARD, "7.0.3"),
    ),
    datastores=(
        Datastore(
            "ds-1",
            "vmfs-01",
            DatastoreType.VMFS,
            True,
            500 * GIB,
            300 * GIB,
            (DatastoreMount("esx-01", True),),
        ),
        Datastore(
            "ds-2",
            "vmfs-02",
            DatastoreType.VMFS,
            True,
            500 * GIB,
            300 * GIB,
            (DatastoreMount("esx-01", True), DatastoreMount("esx-02", True)),
        ),
    ),
    machines=(MT_VM, WEB_VM),
    privileges=frozenset(REQUIRED_PRIVILEGES),
)
CLOUD_VM = Machine(
    id="/subscriptions/s/resourceGroups/rg-dr/providers/Microsoft.Compute/virtualMachines/web-01",
    name="web-01",
    bios_uuid="4210bbbb-0000-0000-0000-000000000020",
    os_type=OsType.LINUX,
    os_version="Ubuntu 22.04",
    power_state=PowerState.ON,
    disks=(
        Disk("md-web0", "web-01-osdisk", 16 * GIB, "disks/web-01-osdisk.img"),
        Disk("md-web1", "web-01-datadisk-0", 16 * GIB, "disks/web-01-datadisk-0.img"),
    ),
    resource_group="rg-dr",
    origin=CloudOrigin.FAILOVER,
)
CLOUD = Inventory(
    site="azure-westeurope",
    kind=SiteKind.CLOUD,
    discovered_at=1_700_000_000.0,
    machines=(CLOUD_VM,),
    resource_groups=(ResourceGroup("rg-dr", "westeurope"), ResourceGroup("rg-other", "westeurope")),
)
ITEM = ItemView(
    id="item-web-01",
    machine="web-01",
    cloud_machine="web-01",
    cloud_resource_group="rg-dr",
    os_type=OsType.LINUX,
    os_version="Ubuntu 22.04",
    physical=False,
    state=ProtectionState.FAILOVER_COMMITTED,
    direction=Direction.FORWARD,
    machine_recorded=True,
    disk_count=2,
)
MT = MasterTargetView(
    name="mt-01",
    heartbeat_age=4.0,
    os_type=OsType.LINUX,
    machine="mt-01",
    retention_volumes=(
        RetentionVolumeView("/mnt/retention", True),
        RetentionVolumeView("/", False, "it holds the master target's installation"),
        RetentionVolumeView("/mnt/fat", False, "its file system is FAT32"),
    ),
)
HEALTHY = ReprotectContext(
    item=ITEM,
    vcenter="vcenter-01",
    onprem=ONPREM,
    cloud=CLOUD,
    master_target=MT,
    process_server=ComponentView("ps-cloud", 2.0),
    agent=ComponentView("web-01", 5.0),
    heartbeat_timeout=30.0,
    request=ReprotectRequest(
        master_target="mt-01", process_server="ps-cloud", datastore="vmfs-01", retention_volume=None
    ),
)
# After reprotect: the item's disks are attached to the master target, where the job put them.
PLACED = tuple(PlacedDisk(d.uuid, d.backing) for d in WEB_VM.disks)
FAILBACK = Situation(
    item=dataclasses.replace(
        ITEM,
        state=ProtectionState.PROTECTED,
        direction=Direction.FAILBACK,
        master_target="mt-01",
        process_server="ps-cloud",
        placed_disks=PLACED,
    ),
    vcenter="vcenter-01",
    onprem=dataclasses.replace(
        ONPREM, machines=(dataclasses.replace(MT_VM, disks=MT_VM.disks + WEB_VM.disks), WEB_VM)
    ),
    cloud=CLOUD,
    master_target=MT,
    process_server=ComponentView("ps-cloud", 2.0),
    agent=ComponentView("web-01", 5.0),
    heartbeat_timeout=30.0,
)

Ctx = Any  # ReprotectContext or Situation: the edits below work on both


def edit(ctx: Ctx, **changes: Any) -> Ctx:
    return dataclasses.replace(ctx, **changes)


def edit_item(**changes: Any) -> Callable[[Ctx], Ctx]:
    return lambda ctx: edit(ctx, item=dataclasses.replace(ctx.item, **changes))


def edit_request(**changes: Any) -> Callable[[Ctx], Ctx]:
    return lambda ctx: edit(ctx, request=dataclasses.replace(ctx.request, **changes))


def edit_mt(**changes: Any) -> Callable[[Ctx], Ctx]:
    return lambda ctx: edit(ctx, master_target=dataclasses.replace(ctx.master_target, **changes))


def edit_onprem(**changes: Any) -> Callable[[Ctx], Ctx]:
    return lambda ctx: edit(ctx, onprem=dataclasses.replace(ctx.onprem, **changes))


def edit_machine(site: str, name: str, **changes: Any) -> Callable[[Ctx], Ctx]:
    """Change one machine of the `onprem` or `cloud` inventory (an inventory edit in a lab)."""

    def apply(ctx: Ctx) -> Ctx:
        inv: Inventory = getattr(ctx, site)
        machines = tuple(dataclasses.replace(m, **changes) if m.name == name else m for m in inv.machines)
        return edit(ctx, **{site: dataclasses.replace(inv, machines=machines)})

    return apply


def delete_machine(site: str, name: str) -> Callable[[Ctx], Ctx]:
    def apply(ctx: Ctx) -> Ctx:
        inv: Inventory = getattr(ctx, site)
        return edit(
            ctx, **{site: dataclasses.replace(inv, machines=tuple(m for m in inv.machines if m.name != name))}
        )

    return apply


def edit_host(name: str, **changes: Any) -> Callable[[Ctx], Ctx]:
    def apply(ctx: Ctx) -> Ctx:
        hosts = tuple(dataclasses.replace(h, **changes) if h.name == name else h for h in ctx.onprem.hosts)
        return edit(ctx, onprem=dataclasses.replace(ctx.onprem, hosts=hosts))

    return apply


def edit_datastore(name: str, **changes: Any) -> Callable[[Ctx], Ctx]:
    def apply(ctx: Ctx) -> Ctx:
        stores = tuple(
            dataclasses.replace(d, **changes) if d.name == name else d for d in ctx.onprem.datastores
        )
        return edit(ctx, onprem=dataclasses.replace(ctx.onprem, datastores=stores))

    return apply


def both(*edits: Callable[[Ctx], Ctx]) -> Callable[[Ctx], Ctx]:
    """Several edits that together change one fact (e.g. a Windows machine and its Windows MT)."""

    def apply(ctx: Ctx) -> Ctx:
        for e in edits:
            ctx = e(ctx)
        return ctx

    return apply


MT_DISK = MT_VM.disks[0]
FULL_MT = tuple(
    dataclasses.replace(MT_DISK, uuid=f"6000c290-x{i:03}", backing=f"[vmfs-01] other/disk{i}.vmdk")
    for i in range(58)
)
WINDOWS_MT = both(
    edit_mt(os_type=OsType.WINDOWS, retention_volumes=(RetentionVolumeView("R:", True),)),
    edit_machine("onprem", "mt-01", os_type=OsType.WINDOWS),
)

# (edit, expected code, an object name the message must contain)
REPROTECT_CASES = [
    pytest.param(
        edit_item(state=ProtectionState.FAILED_OVER), "not-failed-over", "web-01", id="not-failed-over"
    ),
    pytest.param(edit_item(machine_recorded=False), "cs-unknown-machine", "web-01", id="cs-unknown-machine"),
    pytest.param(edit_mt(heartbeat_age=120.0), "cs-unreachable", "mt-01", id="cs-unreachable"),
    pytest.param(
        edit_item(os_type=OsType.WINDOWS, os_version="Windows Server 2019"),
        "mt-os-mismatch",
        "mt-01",
        id="mt-os-mismatch",
    ),
    # 1 own disk + 58 attached for other machines + this machine's 2 = 61.
    pytest.param(
        edit_machine("onprem", "mt-01", disks=(MT_DISK, *FULL_MT)),
        "mt-disk-limit",
        "mt-01",
        id="mt-disk-limit",
    ),
    pytest.param(lambda c: edit(c, agent=None), "agent-not-registered", "web-01", id="agent-not-registered"),
    pytest.param(
        edit_machine("onprem", "web-01", disks=(dataclasses.replace(WEB_VM.disks[0], uuid="6000C290-MT00"),)),
        "disk-uuid-clash",
        "mt-01",
        id="disk-uuid-clash",
    ),
    pytest.param(
        lambda c: edit(c, onprem=None), "vcenter-not-discovered", "vcenter-01", id="vcenter-not-discovered"
    ),
    pytest.param(delete_machine("onprem", "mt-01"), "mt-not-discovered", "mt-01", id="mt-not-discovered"),
    pytest.param(
        lambda c: edit(c, master_target=None),
        "mt-not-discovered",
        "mt-01",
        id="mt-not-discovered-unregistered",
    ),
    pytest.param(
        edit_onprem(datastores=(), warnings=("read-only account: datastores not visible",)),
        "datastores-not-visible",
        "esx-01",
        id="datastores-not-visible",
    ),
    pytest.param(
        edit_onprem(privileges=frozenset(REQUIRED_PRIVILEGES) - {"VirtualMachine.Config.AddExistingDisk"}),
        "vcenter-insufficient-privileges",
        "VirtualMachine.Config.AddExistingDisk",
        id="vcenter-insufficient-privileges",
    ),
    pytest.param(
        lambda c: edit(c, agent=ComponentView("web-01", 600.0)),
        "source-unreachable",
        "web-01",
        id="source-unreachable",
    ),
    pytest.param(
        lambda c: edit(c, process_server=ComponentView("ps-cloud", None)),
        "ps-disconnected",
        "ps-cloud",
        id="ps-disconnected",
    ),
    pytest.param(
        lambda c: edit(c, process_server=None),
        "ps-disconnected",
        "ps-cloud",
        id="ps-disconnected-unregistered",
    ),
    pytest.param(
        edit_machine("onprem", "mt-01", snapshots=(Snapshot("snap-1", "before-patch"),)),
        "mt-has-snapshots",
        "mt-01",
        id="mt-has-snapshots",
    ),
    pytest.param(
        both(
            edit_item(group="g-web"),
            edit_request(via_plan=True),
            lambda c: edit(c, group=(GroupMember("db-01", OsType.WINDOWS, "mt-01"),)),
        ),
        "group-mixed-os",
        "db-01",
        id="group-mixed-os",
    ),
    pytest.param(
        both(
            edit_item(group="g-web"),
            edit_request(via_plan=True),
            lambda c: edit(c, group=(GroupMember("app-01", OsType.LINUX, "mt-02"),)),
        ),
        "group-mixed-mt",
        "app-01",
        id="group-mixed-mt",
    ),
    pytest.param(
        both(
            edit_item(group="g-web"), lambda c: edit(c, group=(GroupMember("app-01", OsType.LINUX, "mt-01"),))
        ),
        "group-needs-recovery-plan",
        "g-web",
        id="group-needs-recovery-plan",
    ),
    pytest.param(
        both(
            edit_item(group="g-web"),
            edit_request(via_plan=True),
            lambda c: edit(c, group=(GroupMember("app-01", OsType.LINUX, None),)),
        ),
        "group-needs-recovery-plan",
        "app-01",
        id="group-needs-recovery-plan-incomplete",
    ),
    pytest.param(edit_machine("onprem", "mt-01", on_lvm=True), "mt-on-lvm", "mt-01", id="mt-on-lvm"),
    pytest.param(
        edit_datastore("vmfs-02", mounts=(DatastoreMount("esx-01", False), DatastoreMount("esx-02", True))),
        "datastore-not-writable",
        "vmfs-02",
        id="datastore-not-writable",
    ),
    pytest.param(
        edit_request(retention_volume="/mnt/fat"),
        "retention-volume-ineligible",
        "FAT32",
        id="retention-volume-ineligible",
    ),
    pytest.param(
        edit_request(retention_volume="/mnt/new"),
        "retention-volume-ineligible",
        "/mnt/new",
        id="retention-volume-ineligible-unknown",
    ),
    pytest.param(
        edit_machine("onprem", "mt-01", tools_running=False),
        "mt-tools-missing",
        "mt-01",
        id="mt-tools-missing",
    ),
    pytest.param(
        edit_machine("onprem", "mt-01", extra_config={}),
        "mt-enableuuid-missing",
        "mt-01",
        id="mt-enableuuid-missing",
    ),
    pytest.param(
        both(
            edit_datastore("vmfs-01", type=DatastoreType.NFS),
            edit_datastore("vmfs-02", type=DatastoreType.NFS),
        ),
        "mt-host-no-vmfs",
        "esx-01",
        id="mt-host-no-vmfs",
    ),
    pytest.param(
        edit_machine(
            "onprem",
            "mt-01",
            controllers=(ScsiController(1000, ScsiType.LSILOGIC), ScsiController(1001, ScsiType.PVSCSI)),
        ),
        "mt-paravirtual-controller",
        "mt-01",
        id="mt-paravirtual-controller",
    ),
    pytest.param(
        edit_host("esx-02", licence=LicenceEdition.FREE),
        "host-free-edition",
        "esx-02",
        id="host-free-edition",
    ),
    pytest.param(
        both(
            WINDOWS_MT,
            edit_item(physical=True, os_type=OsType.WINDOWS, os_version="Windows Server 2008 R2 SP1"),
        ),
        "os-not-failback-capable",
        "web-01",
        id="os-not-failback-capable",
    ),
    pytest.param(
        edit_machine("cloud", "web-01", origin=CloudOrigin.MIGRATION),
        "not-failback-eligible",
        "migrated",
        id="not-failback-eligible",
    ),
    pytest.param(
        edit_machine("cloud", "web-01", origin=CloudOrigin.MANUAL),
        "not-failback-eligible",
        "created in the cloud",
        id="not-failback-eligible-created-in-cloud",
    ),
    pytest.param(
        edit_machine("cloud", "web-01", resource_group="rg-other"),
        "not-failback-eligible",
        "rg-other",
        id="not-failback-eligible-moved",
    ),
    pytest.param(
        delete_machine("cloud", "web-01"),
        "not-failback-eligible",
        "deleted",
        id="not-failback-eligible-deleted",
    ),
    pytest.param(
        edit_item(state=ProtectionState.DISABLED),
        "not-failback-eligible",
        "disabled",
        id="not-failback-eligible-disabled",
    ),
    pytest.param(
        edit_host("esx-02", kind=HypervisorKind.HYPERV), "target-not-esxi", "esx-02", id="target-not-esxi"
    ),
    pytest.param(edit_request(datastore=None), "datastore-required", "web-01", id="datastore-required"),
    pytest.param(
        both(delete_machine("onprem", "web-01"), edit_request(datastore="vmfs-03")),
        "datastore-required",
        "vmfs-03",
        id="datastore-required-new-machine",
    ),
]

FAILBACK_CASES = [
    pytest.param(
        edit_item(state=ProtectionState.PROTECTED, direction=Direction.FORWARD),
        "not-reprotected",
        "web-01",
        id="not-reprotected",
    ),
    pytest.param(edit_item(machine_recorded=False), "cs-unknown-machine", "web-01", id="cs-unknown-machine"),
    pytest.param(edit_mt(heartbeat_age=None), "cs-unreachable", "mt-01", id="cs-unreachable"),
    pytest.param(
        lambda c: edit(c, onprem=None), "vcenter-not-discovered", "vcenter-01", id="vcenter-not-discovered"
    ),
    pytest.param(delete_machine("onprem", "mt-01"), "mt-not-discovered", "mt-01", id="mt-not-discovered"),
    pytest.param(
        edit_onprem(privileges=frozenset({"System.View"})),
        "vcenter-insufficient-privileges",
        "VirtualMachine.Interact.PowerOn",
        id="vcenter-insufficient-privileges",
    ),
    pytest.param(
        lambda c: edit(c, agent=ComponentView("web-01", 90.0)),
        "source-unreachable",
        "web-01",
        id="source-unreachable",
    ),
    pytest.param(
        lambda c: edit(c, process_server=ComponentView("ps-cloud", 31.0)),
        "ps-disconnected",
        "ps-cloud",
        id="ps-disconnected",
    ),
    pytest.param(
        edit_machine("onprem", "mt-01", snapshots=(Snapshot("snap-1", "nightly"),)),
        "mt-has-snapshots",
        "mt-01",
        id="mt-has-snapshots",
    ),
    # Storage vMotion of the master target moved the attached disks to another datastore.
    pytest.param(
        edit_machine(
            "onprem",
            "mt-01",
            disks=(
                MT_DISK,
                *(
                    dataclasses.replace(d, backing=d.backing.replace("vmfs-02", "vmfs-01"))
                    for d in WEB_VM.disks
                ),
            ),
        ),
        "mt-disks-moved",
        "[vmfs-01] web-01/web-01.vmdk",
        id="mt-disks-moved",
    ),
    pytest.param(
        edit_host("esx-02", licence=LicenceEdition.FREE),
        "host-free-edition",
        "esx-02",
        id="host-free-edition",
    ),
    pytest.param(
        both(
            WINDOWS_MT,
            edit_item(
                physical=True, os_type=OsType.WINDOWS, os_version="Microsoft Windows Server 2008 R2 (64-bit)"
            ),
        ),
        "os-not-failback-capable",
        "web-01",
        id="os-not-failback-capable",
    ),
    pytest.param(
        delete_machine("cloud", "web-01"), "not-failback-eligible", "deleted", id="not-failback-eligible"
    ),
    pytest.param(
        edit_host("esx-02", kind=HypervisorKind.WORKSTATION),
        "target-not-esxi",
        "esx-02",
        id="target-not-esxi",
    ),
]


def assert_one_sentence(text: str) -> None:
    assert text.endswith(".") and ". " not in text, text


def codes(problems: list[Any]) -> list[str]:
    return [p.code for p in problems]


def test_healthy_reprotect_passes() -> None:
    assert check_reprotect(HEALTHY) == []


def test_healthy_failback_passes() -> None:
    assert check_failback(FAILBACK) == []


@pytest.mark.parametrize(("change", "code", "named"), REPROTECT_CASES)
def test_reprotect_rule(change: Callable[[Ctx], Ctx], code: str, named: str) -> None:
    problems = check_reprotect(change(HEALTHY))
    assert codes(problems) == [code]
    (problem,) = problems
    assert named in problem.message
    assert problem.rule == RULES[code].id
    assert_one_sentence(problem.message)
    assert_one_sentence(problem.remediation)
    assert "{" not in problem.remediation


@pytest.mark.parametrize(("change", "code", "named"), FAILBACK_CASES)
def test_failback_rule(change: Callable[[Ctx], Ctx], code: str, named: str) -> None:
    problems = check_failback(change(FAILBACK))
    assert codes(problems) == [code]
    (problem,) = problems
    assert named in problem.message
    assert problem.rule == RULES[code].id
    assert_one_sentence(problem.message)
    assert_one_sentence(problem.remediation)
    assert "{" not in problem.remediation


def test_every_code_has_a_case() -> None:
    reprotect = {p.values[1] for p in REPROTECT_CASES}
    failback = {p.values[1] for p in FAILBACK_CASES}
    assert reprotect == {r.code for r in REPROTECT_RULES}
    assert failback == {r.code for r in FAILBACK_RULES}
    # The Azure rules have their cases in tests/azure/test_azure_checks.py, the libvirt rules theirs
    # in tests/libvirt/test_checks.py.
    # LV-CAPTURE's are in tests/dr/test_libvirt_capture.py and tests/libvirt/test_jobs.py.
    others = {
        r.code
        for r in (
            *AZURE_FAILOVER_RULES,
            *AZURE_FAILBACK_RULES,
            *AZURE_AGENT_RULES,
            *LIBVIRT_RULES,
            *CAPTURE_RULES,
        )
    }
    assert reprotect | failback | others == set(RULES)


def test_five_violations_are_all_listed_in_rule_order() -> None:
    broken = both(
        edit_machine(
            "onprem", "mt-01", controllers=(ScsiController(1000, ScsiType.PVSCSI),), tools_running=False
        ),
        edit_host("esx-02", licence=LicenceEdition.FREE),
        edit_request(datastore=None),
        lambda c: edit(c, agent=None),
    )(HEALTHY)
    expected = [
        "agent-not-registered",
        "mt-tools-missing",
        "mt-paravirtual-controller",
        "host-free-edition",
        "datastore-required",
    ]
    assert codes(check_reprotect(broken)) == expected
    order = [r.code for r in REPROTECT_RULES]
    assert expected == sorted(expected, key=order.index)


def test_the_real_operation_refuses_with_the_what_if_list() -> None:
    broken = both(edit_mt(heartbeat_age=None), edit_request(datastore=None))(HEALTHY)
    with pytest.raises(SiteRecoveryError) as refused:
        ensure_reprotect(broken)
    assert list(refused.value.problems) == check_reprotect(broken)
    assert refused.value.status is Status.CONFLICT
    ensure_reprotect(HEALTHY)
    ensure_failback(FAILBACK)
    with pytest.raises(SiteRecoveryError) as refused:
        ensure_failback(edit(FAILBACK, onprem=None))
    assert [p.code for p in refused.value.problems] == ["vcenter-not-discovered"]


def test_read_only_vcenter_account_names_both_causes() -> None:
    """RP-DATASTORES: a read-only account sees no datastores and lacks the privileges; retry works."""
    read_only = edit_onprem(
        datastores=(),
        privileges=frozenset({"System.View"}),
        warnings=("the vCenter account is read-only",),
    )(HEALTHY)
    problems = check_reprotect(read_only)
    assert codes(problems) == ["datastores-not-visible", "vcenter-insufficient-privileges"]
    assert "read-only" in problems[0].message
    assert problems[0].detail["discovery"] == "the vCenter account is read-only"
    assert "credentials" in problems[0].remediation
    # The operator updates the credentials; the next discovery is the healthy one.
    assert check_reprotect(HEALTHY) == []


def test_host_with_only_vsan_and_vvol_is_told_to_attach_vmfs_not_to_fix_credentials() -> None:
    # A real vCenter host with only vSAN/vVol storage: discovery reports the datastores as what they
    # are, so the operator is sent to RP-MT-VMFS, not to the read-only-account remediation.
    only_vsan = both(
        edit_datastore("vmfs-01", type=DatastoreType.VSAN),
        edit_datastore("vmfs-02", type=DatastoreType.VVOL),
    )(HEALTHY)
    problems = check_reprotect(only_vsan)
    assert codes(problems) == ["mt-host-no-vmfs"]
    assert "vmfs-01 (vsan)" in problems[0].message and "vmfs-02 (vvol)" in problems[0].message
    assert "VMFS" in problems[0].remediation and "credentials" not in problems[0].remediation


def test_disk_limit_counts_pending_disks_up_to_exactly_sixty() -> None:
    # 1 own disk + 2 of this machine leave 57 slots for other requests.
    assert check_reprotect(edit(HEALTHY, pending_mt_disks=MAX_MT_DISKS - 3)) == []
    over = check_reprotect(edit(HEALTHY, pending_mt_disks=MAX_MT_DISKS - 2))
    assert codes(over) == ["mt-disk-limit"]
    assert "61" in over[0].message


def test_default_retention_volume_follows_the_master_target_os() -> None:
    windows = both(WINDOWS_MT, edit_item(os_type=OsType.WINDOWS))(HEALTHY)
    assert check_reprotect(windows) == []
    no_r_volume = edit_mt(retention_volumes=(RetentionVolumeView("E:", True),))(windows)
    problems = check_reprotect(no_r_volume)
    assert codes(problems) == ["retention-volume-ineligible"]
    assert "R:" in problems[0].message and "E:" in problems[0].remediation


def test_physical_linux_server_fails_back_as_a_new_vm_on_the_mt_host() -> None:
    # A physical server has no VM to write into: its target host is the master target's (esx-01),
    # so a free licence on esx-02, where a VM of that name lives, does not matter.
    physical = both(edit_item(physical=True), edit_host("esx-02", licence=LicenceEdition.FREE))(HEALTHY)
    assert check_reprotect(physical) == []
    assert [t.kind for t in plan_notes(physical)] == [TaskKind.CREATE_MACHINE]
    assert codes(check_reprotect(edit_host("esx-01", licence=LicenceEdition.FREE)(physical))) == [
        "host-free-edition"
    ]


def test_vm_snapshots_do_not_block_and_are_merged_by_the_job() -> None:
    """RP-VM-SNAP."""
    with_snapshots = edit_machine(
        "onprem", "web-01", snapshots=(Snapshot("s1", "pre-upgrade"), Snapshot("s2", "post-upgrade"))
    )(HEALTHY)
    assert check_reprotect(with_snapshots) == []
    (task,) = plan_notes(with_snapshots)
    assert (task.kind, task.rule, task.machine) == (TaskKind.CONSOLIDATE_SNAPSHOTS, "RP-VM-SNAP", "web-01")
    assert plan_notes(HEALTHY) == []


def test_running_onprem_machine_is_powered_off_and_deleted_one_recreated() -> None:
    running = edit_machine("onprem", "web-01", power_state=PowerState.ON)(HEALTHY)
    assert check_reprotect(running) == []
    assert [(t.kind, t.rule) for t in plan_notes(running)] == [(TaskKind.POWER_OFF, "RPW-5")]
    deleted = delete_machine("onprem", "web-01")(HEALTHY)
    assert check_reprotect(deleted) == []
    (task,) = plan_notes(deleted)
    assert task.kind is TaskKind.CREATE_MACHINE and "esx-01" in task.message and "vmfs-01" in task.message


def test_documentation_table_is_the_registry() -> None:
    """Regenerate with `python -m siterecovery.dr.ruledoc docs/prerequisites.md`."""
    doc = (ROOT / "docs" / "prerequisites.md").read_text()
    assert documented_table(doc) == prerequisites_table()


def test_a_libvirt_onprem_site_is_not_judged_by_the_vsphere_only_rules() -> None:
    """RP-PERMS, VMware Tools, disk.EnableUUID, VMFS and ESXi have no libvirt meaning (the LV-*
    rules judge a libvirt site); the other rules still apply there, and the same facts on vSphere
    hosts still fail."""
    vsphere_only = both(
        edit_onprem(privileges=frozenset()),
        edit_machine("onprem", "mt-01", tools_running=False, extra_config={}),
        edit_datastore("vmfs-01", type=DatastoreType.NFS),
        edit_datastore("vmfs-02", type=DatastoreType.NFS),
    )
    kvm = both(edit_host("esx-01", kind=HypervisorKind.KVM), edit_host("esx-02", kind=HypervisorKind.KVM))
    on_vsphere = codes(check_reprotect(vsphere_only(HEALTHY)))
    assert {"vcenter-insufficient-privileges", "mt-tools-missing", "mt-enableuuid-missing",
            "mt-host-no-vmfs"} <= set(on_vsphere)  # fmt: skip
    assert codes(check_reprotect(kvm(vsphere_only(HEALTHY)))) == []
    broken = edit_request(retention_volume="/mnt/new")
    assert codes(check_reprotect(kvm(broken(vsphere_only(HEALTHY))))) == ["retention-volume-ineligible"]
    # A libvirt recovery site keeps no origin: not a reason to refuse; a recorded one still is.
    no_origin = both(
        edit_machine("cloud", "web-01", origin=None),
        lambda ctx: edit(ctx, cloud=dataclasses.replace(ctx.cloud, hosts=(ctx.onprem.hosts[0],))),
    )
    assert "not-failback-eligible" in codes(check_reprotect(no_origin(HEALTHY)))
    assert codes(check_reprotect(no_origin(kvm(HEALTHY)))) == []  # a KVM host holds the domain
