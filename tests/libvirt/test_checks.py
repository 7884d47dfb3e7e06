"""The libvirt prerequisites (LV-*) against a real libvirtd's discovery: a healthy move passes, and a
move that breaks every rule lists every failing rule at once, each through the rule registry."""

from __future__ import annotations

from dataclasses import replace

from siterecovery.dr.libvirt_checks import (
    LIBVIRT_RULES,
    LibvirtTarget,
    RecordedDomain,
    check_libvirt_site,
    check_libvirt_target,
    check_unreachable,
)
from siterecovery.dr.rules import RULES
from siterecovery.fabrics.base import Disk, DiskSpec, Machine, MachineSpec, OsType, PowerState
from tests.libvirt.conftest import Sites
from tests.libvirt.daemon import PREFIX

MiB = 1 << 20


def recorded(name: str, xml_type: str, arch: str, network: str, disks: int, size: int) -> RecordedDomain:
    machine = Machine(
        "0b8f4a52-0000-4000-8000-000000000001", name, "0b8f4a52-0000-4000-8000-000000000001",
        OsType.LINUX, "", PowerState.ON,
        disks=tuple(Disk(f"/d/{name}/{i}", f"vd{chr(97 + i)}", size, "", bus="virtio") for i in range(disks)),
    )  # fmt: skip
    xml = (
        f"<domain type='{xml_type}'><name>{name}</name><os><type arch='{arch}'>hvm</type></os><devices>"
        "<interface type='network'><mac address='52:54:00:00:00:01'/>"
        f"<source network='{network}'/></interface>"
        "</devices></domain>"
    )
    return RecordedDomain(machine, xml)


def test_a_healthy_move_passes_and_a_bad_one_lists_every_failing_rule_at_once(sites: Sites) -> None:
    fabric = sites.fabric()
    pool = f"{PREFIX}b"
    mt = fabric.create_machine(
        MachineSpec(f"{PREFIX}mt", "", pool, OsType.LINUX, disks=(DiskSpec("os", MiB),))
    )
    good = recorded(f"{PREFIX}db", "qemu", "x86_64", sites.networks[1], 2, MiB)
    target = LibvirtTarget(sites.uri, pool, mt.name)
    assert check_libvirt_target(fabric.discover(), target, [good]) == []
    assert check_libvirt_site(fabric, target, [good]) == []  # discovering live

    fabric.create_snapshot(mt.name, "oops")
    fabric.create_machine(MachineSpec(f"{PREFIX}db", "", pool, OsType.LINUX))  # another domain, same name
    bad = recorded(f"{PREFIX}db", "kvm", "aarch64", f"{PREFIX}no-such-net", 28, MiB)
    inventory = fabric.discover()
    problems = check_libvirt_target(inventory, replace(target, pool=f"{PREFIX}nope"), [bad])
    codes = [p.code for p in problems]
    assert codes == [
        "libvirt-pool-unavailable",
        "libvirt-name-taken",
        "libvirt-domain-type-unsupported",
        "libvirt-network-missing",
        "libvirt-snapshots-present",
        "libvirt-disk-limit",
    ]
    for p in problems:
        assert RULES[p.code].id == p.rule and p.message and p.remediation and "{" not in p.remediation
    assert "aarch64/kvm" in problems[2].message and f"{PREFIX}no-such-net" in problems[3].remediation
    assert "29 virtio disks" in problems[5].message

    huge = recorded(f"{PREFIX}big", "qemu", "x86_64", sites.networks[1], 1, 1 << 60)
    (space,) = check_libvirt_target(inventory, replace(target, master_target=""), [huge])
    assert space.code == "libvirt-pool-full" and space.rule == "LV-POOL-SPACE"
    (reach,) = check_unreachable(
        LibvirtTarget("qemu+ssh://dr-host/system", pool), "dr-host", "connection refused"
    )
    assert reach.code == "libvirt-unreachable" and "dr-host" in reach.remediation
    for name in (mt.name, f"{PREFIX}db"):
        fabric.consolidate_snapshots(name)
        fabric.delete_machine(name)
    covered = {"libvirt-pool-full", "libvirt-unreachable", *codes}
    assert covered == {r.code for r in LIBVIRT_RULES}
    fabric.close()
