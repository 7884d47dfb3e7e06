"""The pure pieces of the libvirt fabric: a recovery domain's XML, the capture record, the console
the VM guest reports on (no libvirtd needed)."""

from __future__ import annotations

from pathlib import Path

from siterecovery.fabrics import libvirt_capture
from siterecovery.fabrics import libvirt_xml as lx
from siterecovery.lab import libvirt_oracle as libvirt_guest

RECORDED = """<domain type='qemu'>
  <name>web</name><uuid>0b5d9f5e-93a5-4c39-9cc0-6a7c9e0b8d11</uuid>
  <metadata>
    <libosinfo:libosinfo xmlns:libosinfo="http://libosinfo.org/xmlns/libvirt/domain/1.0">
      <libosinfo:os id="http://debian.org/debian/12"/></libosinfo:libosinfo>
    <srcap:capture xmlns:srcap="https://siterecovery.dev/xmlns/libvirt/capture/1">
      <srcap:disk target="vda" volume="/pool/web_vda.img"/></srcap:capture>
  </metadata>
  <os><type arch='x86_64'>hvm</type><cmdline>console=ttyS0 sr.machine=web</cmdline></os>
  <devices>
    <disk type='network' device='disk'><driver name='qemu' type='raw'/>
      <source protocol='nbd' name='vda'><host transport='unix' socket='/run/agent/vda.sock'/></source>
      <target dev='vda' bus='virtio'/></disk>
    <interface type='network'><mac address='52:54:00:aa:bb:01'/><source network='net-a'/></interface>
    <serial type='file'><source path='/var/log/sr/web-console.log'/><target port='0'/></serial>
    <console type='file'><source path='/var/log/sr/web-console.log'/><target type='serial'/></console>
  </devices>
</domain>"""


def test_a_recovery_domain_keeps_the_interfaces_and_gets_its_own_console_and_no_capture_record() -> None:
    xml = lx.replace_disk_sources(
        lx.for_new_domain(RECORDED, "web-dr", {"net-a": "net-b"}), {"vda": "/pool-b/web_vda.img"}
    )
    root = lx.parse(xml)
    assert root.findtext("name") == "web-dr" and root.find("uuid") is None
    assert "siterecovery.dev" not in xml and "libosinfo.org" in xml  # the original's record stays its own
    assert [(s.kind, s.path) for s in lx.disk_sources(root)] == [("file", "/pool-b/web_vda.img")]
    assert [(n.mac, n.network) for n in lx.nics(root)] == [("52:54:00:aa:bb:01", "net-b")]
    consoles = {el.get("path") for el in root.iter("source") if el.get("path")}
    assert consoles == {"/var/log/sr/web-dr.web-console.log"}
    assert libvirt_guest.console_path(xml) == Path("/var/log/sr/web-dr.web-console.log")


def test_the_capture_record_follows_the_disk_sources() -> None:
    before = [lx.DiskSource("vda", "virtio", "file", "/pool/web_vda.img", "raw"),
              lx.DiskSource("vdb", "virtio", "file", "/pool/web_vdb.img", "raw")]  # fmt: skip
    export = "nbd+unix://vda@/run/agent/vda.sock"
    captured = libvirt_capture.updated(before, {}, {"vda": export})
    assert captured == {"vda": "/pool/web_vda.img"}
    # Pointing it at the export again (a replay, its source now the export) keeps the volume.
    nbd = [lx.DiskSource("vda", "virtio", "network", "vda", "raw", "nbd", "/run/agent/vda.sock"), before[1]]
    assert libvirt_capture.updated(nbd, captured, {"vda": export}) == captured
    assert libvirt_capture.updated(nbd, captured, {"vda": "/pool/web_vda.img"}) == {}
    assert libvirt_capture.xml({}) is None


def test_only_a_vm_guest_domain_on_a_file_console_is_observable(tmp_path: Path) -> None:
    plain = RECORDED.replace(" sr.machine=web", "")
    assert libvirt_guest.console_path(plain) is None
    assert libvirt_guest.console_path(RECORDED.replace("type='file'", "type='pty'")) is None
    console = tmp_path / "console.log"
    console.write_text(
        "boot noise\nSR MKFS\nSR VERDICT ok=1 records=0 torn=0 first_bad=1 files=0 quiesce=- reason=empty\n"
        "SR FLUSHED 1\nSR FLUSHED 2\n"
    )
    verdict = libvirt_guest.start_verdict(console, "web", 0.0)
    assert verdict is not None and verdict["ok"] and verdict["records"] == 0
    assert libvirt_guest.flushed(console, "web") == 2
    assert libvirt_guest.start_verdict(console, "web", console.stat().st_mtime + 1) is None  # an older boot
    console.write_text(
        "SR FSCK rc=4\nSR VERDICT ok=1 records=5 torn=0 first_bad=6 files=5 quiesce=- reason=clean\n"
    )
    failed = libvirt_guest.start_verdict(console, "web", 0.0)
    assert failed is not None and not failed["ok"] and "e2fsck" in str(failed["reason"])
