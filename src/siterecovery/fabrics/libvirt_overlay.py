"""Snapshots of a domain on raw volumes: a qcow2 overlay per disk, merged or dropped later.

libvirt's internal snapshots need qcow2 disks, and the master target writes replica volumes raw
(it writes the disk's bytes at their offsets). A recovery domain must still be able to go back to
its failover point before commit (FW-2), so it runs as ASR's recovery machines do: each disk a
qcow2 overlay whose backing file is the replica volume, holding everything the domain writes.

- **create** (the domain stopped): an empty overlay volume per disk, in the pool of its replica
  volume, named `<volume>.<snapshot>.qcow2`; the persistent definition points at the overlays and
  records them in the domain's metadata (`<sr:overlay>`), which discovery lists as a snapshot.
- **revert** (stopped): each overlay is replaced by an empty one, so the disks read as the replica
  volumes again; the master target may then roll those volumes to another point underneath.
- **remove**: the overlays are merged into the volumes (`virDomainBlockCommit` of the active layer,
  then a pivot; a stopped domain is started paused for it and stopped again, which works on a
  remote host too), the definition points at the volumes again and the overlays are deleted.
"""

from __future__ import annotations

import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import libvirt
from siterecovery.fabrics import libvirt_xml as lx
from siterecovery.fabrics.base import FabricError

NS = "https://siterecovery.dev/xmlns/libvirt/overlay/1"
PREFIX = "sr"
MERGE_TIMEOUT = 600.0  # a block commit of everything a recovery domain wrote, on a loaded host
_CONFIG = libvirt.VIR_DOMAIN_AFFECT_CONFIG


@dataclass(frozen=True)
class Overlay:
    """The overlay snapshot a domain runs on: its id and, per disk target, (volume, overlay)."""

    id: str
    name: str
    disks: dict[str, tuple[str, str]]

    def xml(self) -> str:
        root = ET.Element("overlay", id=self.id, name=self.name)
        for target, (base, top) in sorted(self.disks.items()):
            ET.SubElement(root, "disk", target=target, base=base, overlay=top)
        return ET.tostring(root, encoding="unicode")


def read(dom: libvirt.virDomain) -> Overlay | None:
    """The domain's overlay snapshot, from its persistent definition's metadata."""
    try:
        text = dom.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, NS, _CONFIG)
    except libvirt.libvirtError:
        return None  # no such metadata
    root = lx.parse(text)
    disks = {d.get("target", ""): (d.get("base", ""), d.get("overlay", "")) for d in root.findall("disk")}
    return Overlay(root.get("id", ""), root.get("name", ""), disks)


# The fabric's `_call`: runs a libvirt call, a libvirt error becoming a FabricError.
Call = Callable[[str, Callable[[], Any]], Any]


def _new_overlay(conn: libvirt.virConnect, base: str, name: str, call: Call) -> str:
    try:
        vol = conn.storageVolLookupByPath(base)
    except libvirt.libvirtError:
        # The master target writes replica files straight into the pool's directory: libvirt
        # lists one only after a refresh of its pool.
        for pool in conn.listAllStoragePools(libvirt.VIR_CONNECT_LIST_STORAGE_POOLS_ACTIVE):
            pool.refresh(0)
        vol = call(f"find volume {base}", lambda: conn.storageVolLookupByPath(base))
    pool = call(f"find the pool of {base}", vol.storagePoolLookupByVolume)
    size = int(vol.info()[1])
    xml = (
        f"<volume><name>{name}</name><capacity unit='bytes'>{size}</capacity>"
        "<target><format type='qcow2'/></target>"
        f"<backingStore><path>{base}</path><format type='raw'/></backingStore></volume>"
    )
    top = call(f"create overlay {name}", lambda: pool.createXML(xml, 0))
    return str(top.path())


def delete_volume(conn: libvirt.virConnect, path: str) -> None:
    try:
        vol = conn.storageVolLookupByPath(path)
    except libvirt.libvirtError:
        return  # gone already: a replay
    vol.delete(0)


def create(
    conn: libvirt.virConnect, dom: libvirt.virDomain, name: str, sources: list[lx.DiskSource], call: Call
) -> Overlay:
    if dom.isActive():
        raise FabricError(
            "libvirt-snapshot-unsupported",
            f"Domain {dom.name()} runs on raw volumes: an overlay snapshot is taken only while stopped.",
            f"Power {dom.name()} off, then snapshot it.",
        )
    snap_id = f"{name}-{time.time_ns()}"
    disks = {
        s.target: (s.path, _new_overlay(conn, s.path, f"{Path(s.path).name}.{snap_id}.qcow2", call))
        for s in sources
    }
    overlay = Overlay(snap_id, name, disks)
    xml = lx.replace_disk_sources(
        dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE),
        {t: top for t, (_, top) in disks.items()},
        {t: "qcow2" for t in disks},
    )
    call(f"redefine {dom.name()} on its overlays", lambda: conn.defineXML(xml))
    call(
        f"record the overlays of {dom.name()}",
        lambda: dom.setMetadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, overlay.xml(), PREFIX, NS, _CONFIG),
    )
    return overlay


def revert(conn: libvirt.virConnect, dom: libvirt.virDomain, overlay: Overlay, call: Call) -> None:
    if dom.isActive():
        raise FabricError(
            "machine-powered-on",
            f"Domain {dom.name()} is running; its overlays are replaced only while it is stopped.",
            f"Power {dom.name()} off, then revert it.",
        )
    for base, top in overlay.disks.values():
        delete_volume(conn, top)
        _new_overlay(conn, base, Path(top).name, call)


def remove(conn: libvirt.virConnect, dom: libvirt.virDomain, overlay: Overlay, call: Call) -> None:
    """Merge the overlays into their volumes and run (or define) the domain on the volumes again."""
    started = not dom.isActive()
    if started:  # block jobs need a QEMU: a paused one does no guest work
        call(
            f"start {dom.name()} paused to merge",
            lambda: dom.createWithFlags(libvirt.VIR_DOMAIN_START_PAUSED),
        )
    try:
        for target in overlay.disks:
            _commit_active(dom, target, call)
    finally:
        if started:
            call(f"stop {dom.name()}", dom.destroy)
    bases = {t: base for t, (base, _) in overlay.disks.items()}
    xml = lx.replace_disk_sources(
        dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE), bases, {t: "raw" for t in bases}
    )
    call(f"redefine {dom.name()} on its volumes", lambda: conn.defineXML(xml))
    call(
        f"forget the overlays of {dom.name()}",
        lambda: dom.setMetadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, None, PREFIX, NS, _CONFIG),
    )
    for _, top in overlay.disks.values():
        delete_volume(conn, top)


def _commit_active(dom: libvirt.virDomain, target: str, call: Call) -> None:
    live = lx.disk_sources(lx.parse(dom.XMLDesc(0)))
    if not any(s.target == target and s.format == "qcow2" for s in live):
        return  # merged and pivoted already: a replay
    call(
        f"merge the overlay of {target}",
        lambda: dom.blockCommit(target, None, None, 0, libvirt.VIR_DOMAIN_BLOCK_COMMIT_ACTIVE),
    )
    deadline = time.monotonic() + MERGE_TIMEOUT
    while True:
        info = dom.blockJobInfo(target, 0)
        # Ready once everything is copied; the pivot is refused until then (and retried).
        if info and info.get("cur") == info.get("end"):
            try:
                dom.blockJobAbort(target, libvirt.VIR_DOMAIN_BLOCK_JOB_ABORT_PIVOT)
                return
            except libvirt.libvirtError:
                pass
        if time.monotonic() > deadline:
            raise FabricError(
                "libvirt-merge-timeout",
                f"Merging the overlay of {target} of {dom.name()} did not finish in {MERGE_TIMEOUT:.0f} s.",
                f"Check the block job (`virsh blockjob {dom.name()} {target}`), then retry.",
            )
        time.sleep(0.2)
