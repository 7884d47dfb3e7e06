"""Which volume lies under a captured disk: the domain's own record of capture (option a).

Protecting a domain points its disk at the agent's NBD export over a Unix socket; the agent serves
the domain's volume. The volume is still where the disk's data lives (what the master target
writes on a reprotect, what an agent serves, what a recovery domain is defined over), so the
fabric keeps it in the domain's metadata (`<sr:capture>`) when it switches the source, and
discovery reports the disk by its volume: `Disk.uuid` and `backing` stay the volume's path
whether or not capture is in place, as a VMDK's identity does under an I/O filter. Switching a
disk back to a file forgets its entry.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET

import libvirt
from siterecovery.fabrics import libvirt_xml as lx

NS = lx.CAPTURE_NS
PREFIX = "srcap"
_CONFIG = libvirt.VIR_DOMAIN_AFFECT_CONFIG


def read(dom: libvirt.virDomain) -> dict[str, str]:
    """Disk target -> the volume under the agent's export serving it."""
    try:
        text = dom.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, NS, _CONFIG)
    except libvirt.libvirtError:
        return {}  # never captured
    return {d.get("target", ""): d.get("volume", "") for d in lx.parse(text).findall("disk")}


def xml(volumes: dict[str, str]) -> str | None:
    if not volumes:
        return None  # removes the element
    root = ET.Element("capture")
    for target, volume in sorted(volumes.items()):
        ET.SubElement(root, "disk", target=target, volume=volume)
    return ET.tostring(root, encoding="unicode")


def updated(before: list[lx.DiskSource], known: dict[str, str], sources: dict[str, str]) -> dict[str, str]:
    """The record after pointing `sources` (target -> new source) at new places: a file or block
    source replaced by an NBD export is remembered; a disk pointed at a file again is forgotten."""
    out = dict(known)
    for src in before:
        new = sources.get(src.target)
        if new is None:
            continue
        if new.startswith("nbd+unix://"):
            if src.kind in ("file", "block") and src.path:
                out[src.target] = src.path
        else:
            out.pop(src.target, None)
    return out


def set_record(dom: libvirt.virDomain, volumes: dict[str, str]) -> None:
    dom.setMetadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, xml(volumes), PREFIX, NS, _CONFIG)
