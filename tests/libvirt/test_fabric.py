"""The libvirt fabric against a real libvirtd: discovery into the Inventory, and the operations a
DR workflow performs (define, power, disks, snapshots, storage moves, delete) with their refusals."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from siterecovery.fabrics.base import (
    DatastoreType,
    Disk,
    DiskSpec,
    FabricError,
    HypervisorKind,
    IpMode,
    MachineSpec,
    Nic,
    OsType,
    PowerState,
)
from tests.conftest import require_tool
from tests.libvirt.conftest import BRIDGES, Sites
from tests.libvirt.daemon import PREFIX

MiB = 1 << 20


def domain_xml(name: str, disks: str, network: str) -> str:
    # QEMU runs as root (a static DAC label, as docs/libvirt.md suggests): the jobs point the disk
    # at the agent's socket, which lies under pytest's private folder.
    return f"""<domain type='qemu'>
  <name>{name}</name>
  <metadata><libosinfo:libosinfo xmlns:libosinfo="http://libosinfo.org/xmlns/libvirt/domain/1.0">
    <libosinfo:os id="http://debian.org/debian/12"/></libosinfo:libosinfo></metadata>
  <memory unit='MiB'>64</memory><vcpu>1</vcpu>
  <os><type arch='x86_64' machine='q35'>hvm</type></os>
  <seclabel type='static' model='dac' relabel='no'><label>+0:+0</label></seclabel>
  <devices>{disks}
    <interface type='network'><mac address='52:54:00:aa:bb:01'/><source network='{network}'/>
      <model type='virtio'/></interface>
  </devices>
</domain>"""


def qemu_io(fmt: str, path: str, command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [require_tool("qemu-io"), "-f", fmt, "-c", command, path], capture_output=True, text=True, timeout=60
    )


def test_discovery_maps_domains_disks_pools_networks_and_the_host(sites: Sites) -> None:
    fabric = sites.fabric()
    pool_a = f"{PREFIX}a"
    raw = fabric.create_volume(fabric.pool(pool_a), f"{PREFIX}web_vda.img", 8 * MiB, "raw")
    disks = f"""
    <disk type='file' device='disk'><driver name='qemu' type='raw'/><source file='{raw}'/>
      <target dev='vda' bus='virtio'/></disk>
    <disk type='network' device='disk'><driver name='qemu' type='raw'/>
      <source protocol='nbd' name='vdb'><host transport='unix' socket='/run/sr/web/vdb.sock'/></source>
      <target dev='sdb' bus='sata'/></disk>
    <disk type='block' device='disk'><driver name='qemu' type='raw'/><source dev='/dev/sr-test-none'/>
      <target dev='vdc' bus='virtio'/></disk>
    <disk type='file' device='cdrom'><target dev='sdc' bus='sata'/><readonly/></disk>"""
    fabric.define(domain_xml(f"{PREFIX}web", disks, sites.networks[0]))
    inv = fabric.discover()

    host = inv.hosts[0]
    assert host.kind is HypervisorKind.KVM and host.version.startswith("libvirt 9.")
    assert "x86_64/qemu" in host.domain_types and host.cpus >= 1 and host.memory_bytes > 0
    pools = {d.name: d for d in inv.datastores}
    assert pools[pool_a].type is DatastoreType.OTHER and pools[pool_a].accessible
    assert pools[pool_a].writable_on(host.name) and pools[pool_a].free_bytes > 0
    assert {(n.name, n.active, n.bridge) for n in inv.networks} >= {
        (sites.networks[0], True, BRIDGES[0]),
        (sites.networks[1], True, BRIDGES[1]),
    }
    web = inv.machine(f"{PREFIX}web")
    assert web is not None and web.power_state is PowerState.OFF and web.snapshots == ()
    assert (web.os_type, web.os_version) == (OsType.LINUX, "debian 12")
    by_label = {d.label: d for d in web.disks}
    assert set(by_label) == {"vda", "sdb", "vdc"}  # the cdrom holds no data to replicate
    assert (by_label["vda"].backing, by_label["vda"].size_bytes, by_label["vda"].datastore) == (
        raw,
        8 * MiB,
        pool_a,
    )
    assert by_label["vda"].bus == "virtio" and by_label["sdb"].bus == "sata"
    assert by_label["sdb"].uuid == "nbd+unix://vdb@/run/sr/web/vdb.sock"
    assert by_label["vdc"].backing == "/dev/sr-test-none" and by_label["vdc"].size_bytes == 0
    assert web.nics == (Nic("net0", "52:54:00:aa:bb:01", IpMode.DHCP, network=sites.networks[0]),)
    assert inv.machine(web.id) == web  # by UUID as well as by name
    fabric.close()


def test_operations_define_power_disks_snapshots_and_delete(sites: Sites) -> None:
    fabric = sites.fabric()
    pool_a, pool_b = f"{PREFIX}a", f"{PREFIX}b"
    nic = Nic("n", "52:54:00:aa:bb:02", IpMode.DHCP, network=sites.networks[1])
    spec = MachineSpec(
        f"{PREFIX}app", "", pool_a, OsType.LINUX, disks=(DiskSpec("os", 4 * MiB),), nics=(nic,)
    )
    app = fabric.create_machine(spec)
    with pytest.raises(FabricError) as taken:
        fabric.create_machine(spec)
    assert taken.value.code == "machine-exists"
    (vda,) = app.disks
    assert vda.backing == str(sites.pools[pool_a] / f"{PREFIX}app_os.qcow2") and vda.size_bytes == 4 * MiB

    # Snapshots are libvirt's internal ones: a revert brings the disk's data back.
    assert qemu_io("qcow2", vda.backing, "write -P 0xaa 0 64k").returncode == 0
    snap = fabric.create_snapshot(app.name, "before-boot")
    assert qemu_io("qcow2", vda.backing, "write -P 0xbb 0 64k").returncode == 0
    fabric.revert_to_snapshot(app.name, snap.id)
    assert qemu_io("qcow2", vda.backing, "read -P 0xaa 0 64k").returncode == 0
    assert [s.id for s in fabric.discover().machine(app.name).snapshots] == [snap.id]  # type: ignore[union-attr]
    fabric.remove_snapshot(app.name, snap.id)
    with pytest.raises(FabricError) as gone:
        fabric.revert_to_snapshot(app.name, snap.id)
    assert gone.value.code == "snapshot-not-found"
    fabric.create_snapshot(app.name, "one")
    fabric.create_snapshot(app.name, "two")
    assert fabric.consolidate_snapshots(app.name) == 2

    # A raw disk has no internal snapshots: refused by name, nothing half made.
    raw = fabric.create_volume(fabric.pool(pool_b), f"{PREFIX}replica_vdb.img", 2 * MiB, "raw")
    fabric.attach_disks(app.name, [Disk(raw, "vdb", 2 * MiB, raw, pool_b)])
    fabric.attach_disks(app.name, [Disk(raw, "vdb", 2 * MiB, raw, pool_b)])  # a replay attaches nothing
    app = fabric.discover().machine(app.name)  # type: ignore[assignment]
    assert app is not None and [d.backing for d in app.disks] == [vda.backing, raw]
    with pytest.raises(FabricError) as unsupported:
        fabric.create_snapshot(app.name, "x")
    assert unsupported.value.code == "libvirt-snapshot-unsupported" and "vdb" in unsupported.value.message
    (detached,) = fabric.detach_disks(app.name, [raw])
    assert detached.backing == raw
    with pytest.raises(FabricError) as not_attached:
        fabric.detach_disks(app.name, [raw])
    assert not_attached.value.code == "disk-not-attached"

    # Power: a running TCG domain (no bootable disk: it sits in firmware, which is enough here).
    fabric.power_on(app.name)
    fabric.power_on(app.name)
    assert fabric.discover().machine(app.name).power_state is PowerState.ON  # type: ignore[union-attr]
    with pytest.raises(FabricError) as running:
        fabric.delete_machine(app.name)
    assert running.value.code == "machine-powered-on"
    with pytest.raises(FabricError) as no_move:
        fabric.move_storage(app.name, pool_b)
    assert no_move.value.code == "machine-powered-on"
    # A running domain takes a new disk source (the agent's export) at its next power cycle.
    assert fabric.set_disk_sources(app.name, {"vda": "nbd+unix://vda@/run/sr/app/vda.sock"}) is False
    live = fabric.xml(app.name, inactive=False)
    assert vda.backing in live and "vda.sock" in fabric.xml(app.name)
    fabric.power_off(app.name)
    assert fabric.discover().machine(app.name).power_state is PowerState.OFF  # type: ignore[union-attr]
    assert fabric.set_disk_sources(app.name, {"vda": vda.backing}) is True

    # Storage moves to another pool; deleting the domain deletes the volumes it owns, not borrowed ones.
    fabric.move_storage(app.name, pool_b)
    moved = sites.pools[pool_b] / f"{PREFIX}app_os.qcow2"
    assert moved.exists() and not Path(vda.backing).exists()
    assert qemu_io("qcow2", str(moved), "read -P 0xaa 0 64k").returncode == 0
    fabric.attach_disks(app.name, [Disk(raw, "vdb", 2 * MiB, raw, pool_b)])
    fabric.delete_machine(app.name)
    assert not moved.exists() and Path(raw).exists()
    with pytest.raises(FabricError) as missing:
        fabric.power_on(app.name)
    assert missing.value.code == "machine-not-found"
    with pytest.raises(FabricError) as no_pool:
        fabric.create_machine(MachineSpec(f"{PREFIX}x", "", "nope", OsType.LINUX))
    assert no_pool.value.code == "datastore-not-found"
    fabric.close()


def test_a_domain_on_raw_volumes_snapshots_as_qcow2_overlays(sites: Sites) -> None:
    """The recovery domain's snapshot until commit: writes land in an overlay; a revert drops them;
    a remove merges them into the volume (the domain stopped: started paused for the block commit);
    deleting a domain on overlays deletes the overlays, never the volume under them."""
    fabric = sites.fabric()
    pool_b = f"{PREFIX}b"
    raw = fabric.create_volume(fabric.pool(pool_b), f"{PREFIX}ovl_vda.img", 4 * MiB, "raw")
    assert qemu_io("raw", raw, "write -P 0xa1 0 64k").returncode == 0
    disk = f"<disk type='file' device='disk'><driver name='qemu' type='raw'/><source file='{raw}'/>" + (
        "<target dev='vda' bus='virtio'/></disk>"
    )
    name = f"{PREFIX}ovl"
    fabric.define(domain_xml(name, disk, sites.networks[1]))
    snap = fabric.create_snapshot(name, "before-commit")
    dom = fabric.discover().machine(name)
    assert dom is not None and [s.id for s in dom.snapshots] == [snap.id]
    (overlay,) = [d.backing for d in dom.disks]
    assert overlay == f"{raw}.{snap.id}.qcow2" and dom.disks[0].datastore == pool_b
    with pytest.raises(FabricError) as twice:
        fabric.create_snapshot(name, "again")
    assert twice.value.code == "libvirt-snapshot-unsupported"

    # What the domain writes goes to the overlay; a revert empties it, the volume never changed.
    assert qemu_io("qcow2", overlay, "write -P 0xb2 0 64k").returncode == 0
    assert qemu_io("raw", raw, "read -P 0xa1 0 64k").stdout.count("Pattern verification failed") == 0
    fabric.revert_to_snapshot(name, snap.id)
    assert qemu_io("qcow2", overlay, "read -P 0xa1 0 64k").stdout.count("Pattern verification failed") == 0
    # Remove merges what was written since into the volume and runs the domain on it again.
    assert qemu_io("qcow2", overlay, "write -P 0xc3 64k 64k").returncode == 0
    fabric.remove_snapshot(name, snap.id)
    dom = fabric.discover().machine(name)
    assert dom is not None and dom.snapshots == () and [d.backing for d in dom.disks] == [raw]
    assert dom.power_state is PowerState.OFF and not Path(overlay).exists()
    merged = qemu_io("raw", raw, "read -P 0xc3 64k 64k")
    assert merged.returncode == 0 and "Pattern verification failed" not in merged.stdout

    # Deleting a domain on overlays: its overlays go, the replica volume under them stays.
    snap = fabric.create_snapshot(name, "before-commit")
    (overlay,) = [d.backing for d in fabric.discover().machine(name).disks]  # type: ignore[union-attr]
    fabric.delete_machine(name)
    assert not Path(overlay).exists() and Path(raw).exists()


def test_an_unreachable_uri_is_a_clear_problem(tmp_path: Path) -> None:
    from siterecovery.fabrics.libvirt import LibvirtFabric

    fabric = LibvirtFabric(f"qemu:///system?socket={tmp_path}/none.sock")
    with pytest.raises(FabricError) as unreachable:
        fabric.discover()
    assert unreachable.value.code == "libvirt-unreachable" and "none.sock" in unreachable.value.message


def test_fabrics_add_libvirt_discovers_through_the_server(sites: Sites, tmp_path: Path) -> None:
    from tests.conftest import free_port, run_cli
    from tests.control.conftest import ConfigServer

    cs = ConfigServer(state_dir=tmp_path / "state", port=free_port(), log=tmp_path / "server.log")
    cs.start()
    try:
        resp = cs.api("POST", "/api/fabrics", json={"name": "kvm", "kind": "libvirt", "connection": {}})
        assert resp.status_code in (400, 422) and "connection.uri" in resp.text, resp.text
        out = run_cli(
            "-o", "json", "fabrics", "add", "libvirt", "--uri", sites.uri, "--name", "kvm", env=cs.env
        )
        added = json.loads(out.stdout)
        assert added["kind"] == "libvirt" and added["discovery_error"] == ""
        assert added["summary"]["hosts"] == 1 and added["summary"]["networks"] >= 2
        assert added["summary"]["datastores"] >= 2
        assert cs.api("GET", "/api/fabrics/kvm").json()["summary"] == added["summary"]
        broken = {"uri": f"qemu:///system?socket={tmp_path}/none.sock"}
        resp = cs.api("POST", "/api/fabrics", json={"name": "gone", "kind": "libvirt", "connection": broken})
        assert resp.json().get("code") == "libvirt-unreachable" or "libvirt-unreachable" in resp.text, (
            resp.text
        )
    finally:
        cs.stop()


def test_a_server_without_the_libvirt_binding_refuses_a_libvirt_fabric_by_code() -> None:
    # A process in which `import libvirt` fails, as on a server installed without the extra.
    script = (
        "import sys; sys.modules['libvirt'] = None\n"
        "from types import SimpleNamespace\n"
        "from siterecovery.dr.fabric_access import open_fabric\n"
        "from siterecovery.errors import SiteRecoveryError\n"
        "row = SimpleNamespace(kind='libvirt', connection={'uri': 'test:///default'}, name='x', site='s')\n"
        "try:\n    open_fabric(None, row)\nexcept SiteRecoveryError as e:\n    print(e.first.code)\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "libvirt-binding-missing", out.stderr
