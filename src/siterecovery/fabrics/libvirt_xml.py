"""libvirt domain XML read into the inventory's values, and the few XML pieces the fabric writes.

Pure functions over XML text, so the mapping is the same for a live domain, a defined one and the
domain XML a protected item recorded. A disk's identity (`Disk.uuid`) is where its data lives: the
source file or block device path, or `nbd+unix://EXPORT@SOCKET` (`proto://host/name` for other
network disks). libvirt gives disks no UUID, and the source is what follows a disk from the
protected domain to the master target and back, the way a VMDK's UUID does on vSphere. `Disk.label`
is the target device (vda, sdb).
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from siterecovery.fabrics.base import Disk, FabricError, IpMode, Nic, OsType

# Most disks each bus takes on one domain. virtio-blk: one PCI slot per disk on the root bus of
# q35 (32 slots less those the machine itself uses); sata: the one AHCI controller q35 has; ide:
# two channels of two on i440fx; scsi: one virtio-scsi controller's targets a guest probes.
BUS_LIMITS: dict[str, int] = {"virtio": 28, "sata": 6, "ide": 4, "scsi": 256, "usb": 4}
# The namespace of the fabric's own domain metadata (capture, overlays): not copied to a new domain.
OWN_METADATA = "https://siterecovery.dev/xmlns/libvirt/"
# The domain's record of capture (`fabrics/libvirt_capture.py`): disk target -> the volume under the export.
CAPTURE_NS = OWN_METADATA + "capture/1"
_PREFIX = {"virtio": "vd", "sata": "sd", "scsi": "sd", "usb": "sd", "ide": "hd"}


@dataclass(frozen=True)
class DiskSource:
    """One `<disk device='disk'>` of a domain, as libvirt describes it."""

    target: str
    bus: str
    kind: str  # file | block | network | volume
    path: str  # file or device path; the NBD export name of a network disk
    format: str  # raw | qcow2 | "" (unknown)
    protocol: str = ""  # network disks: nbd, rbd, iscsi, ...
    socket: str = ""  # nbd over a Unix socket
    host: str = ""  # network disks over TCP

    @property
    def identity(self) -> str:
        if self.kind == "network":
            if self.socket:
                return f"{self.protocol}+unix://{self.path}@{self.socket}"
            return f"{self.protocol}://{self.host}/{self.path}"
        return self.path


def parse(xml: str) -> ET.Element:
    try:
        return ET.fromstring(xml)
    except ET.ParseError as exc:
        raise FabricError(
            "libvirt-xml-invalid",
            f"The domain XML cannot be read: {exc}.",
            "Check the domain's definition (`virsh dumpxml`).",
        ) from exc


def disk_sources(root: ET.Element) -> list[DiskSource]:
    found: list[DiskSource] = []
    for disk in root.findall("./devices/disk"):
        if disk.get("device", "disk") != "disk":
            continue  # cdroms and floppies hold no replicated data
        target = disk.find("target")
        source = disk.find("source")
        driver = disk.find("driver")
        kind = disk.get("type", "file")
        dev = target.get("dev", "") if target is not None else ""
        bus = (target.get("bus") if target is not None else None) or _bus_of(dev)
        fmt = driver.get("type", "") if driver is not None else ""
        if source is None:
            found.append(DiskSource(dev, bus, kind, "", fmt))
        elif kind == "network":
            host = source.find("host")
            socket = host.get("socket", "") if host is not None and host.get("transport") == "unix" else ""
            name = host.get("name", "") if host is not None and not socket else ""
            found.append(
                DiskSource(
                    dev, bus, kind, source.get("name", ""), fmt, source.get("protocol", ""), socket, name
                )
            )
        elif kind == "volume":
            found.append(
                DiskSource(dev, bus, kind, f"{source.get('pool', '')}/{source.get('volume', '')}", fmt)
            )
        else:
            found.append(DiskSource(dev, bus, kind, source.get("file") or source.get("dev") or "", fmt))
    return found


def captured(root: ET.Element) -> dict[str, str]:
    """Disk target -> the volume under the agent's export serving it, from the domain's metadata."""
    record = root.find(f"./metadata/{{{CAPTURE_NS}}}capture")
    if record is None:
        return {}
    return {d.get("target", ""): d.get("volume", "") for d in record if d.tag.endswith("disk")}


def _bus_of(dev: str) -> str:
    return "virtio" if dev.startswith("vd") else "ide" if dev.startswith("hd") else "sata"


def disks(root: ET.Element, size_of: Callable[[DiskSource], tuple[int, str]]) -> tuple[Disk, ...]:
    """The domain's disks; `size_of` answers a source's size and the pool (datastore) holding it."""
    out: list[Disk] = []
    for src in disk_sources(root):
        size, pool = size_of(src)
        out.append(Disk(src.identity, src.target, size, src.identity, pool, bus=src.bus))
    return tuple(out)


def nics(root: ET.Element) -> tuple[Nic, ...]:
    # The guest's addressing lives in the guest; libvirt knows only a DHCP lease or nothing, so
    # every interface is DHCP from here, and its MAC and network are kept for the recovery domain.
    out: list[Nic] = []
    for i, iface in enumerate(root.findall("./devices/interface")):
        mac = iface.find("mac")
        src = iface.find("source")
        network = ""
        if src is not None:
            network = src.get("network") or src.get("bridge") or src.get("dev") or ""
        out.append(
            Nic(f"net{i}", mac.get("address", "") if mac is not None else "", IpMode.DHCP, network=network)
        )
    return tuple(out)


def os_type(root: ET.Element) -> tuple[OsType, str]:
    # libosinfo's metadata (virt-install writes it) names the operating system, when present.
    for el in root.iter():
        if el.tag.endswith("}os") and el.get("id"):
            ident = el.get("id", "")
            name = " ".join(ident.rstrip("/").split("/")[-2:])  # http://debian.org/debian/12 -> debian 12
            return (OsType.WINDOWS if "microsoft.com" in ident else OsType.LINUX), name
    return OsType.LINUX, ""


def next_target(used: Sequence[str], bus: str) -> str:
    prefix = _PREFIX.get(bus, "vd")
    for i in range(26 * 27):
        name = prefix + (chr(97 + i) if i < 26 else chr(96 + i // 26) + chr(97 + i % 26))
        if name not in used:
            return name
    raise FabricError(
        "libvirt-disk-limit", f"No free {bus} target is left.", "Detach disks the domain no longer needs."
    )


def disk_xml(source: str, target: str, bus: str, fmt: str) -> str:
    """A `<disk>` for a file, a block device or `nbd+unix://EXPORT@SOCKET` (the agent's export)."""
    disk = ET.Element("disk", device="disk")
    if source.startswith("nbd+unix://"):
        export, socket = source.removeprefix("nbd+unix://").split("@", 1)
        disk.set("type", "network")
        ET.SubElement(disk, "driver", name="qemu", type="raw", cache="none")
        src = ET.SubElement(disk, "source", protocol="nbd", name=export)
        ET.SubElement(src, "host", transport="unix", socket=socket)
    else:
        block = source.startswith("/dev/")
        disk.set("type", "block" if block else "file")
        ET.SubElement(disk, "driver", name="qemu", type=fmt or "raw", cache="none")
        ET.SubElement(disk, "source", {"dev" if block else "file": source})
    ET.SubElement(disk, "target", dev=target, bus=bus)
    return ET.tostring(disk, encoding="unicode")


def replace_disk_sources(xml: str, sources: dict[str, str], formats: dict[str, str] | None = None) -> str:
    """The domain XML with each disk target in `sources` pointing at a new source (see disk_xml)."""
    root = parse(xml)
    devices = root.find("devices")
    if devices is None:
        raise FabricError("libvirt-xml-invalid", "The domain XML has no devices.", "Redefine the domain.")
    for i, disk in enumerate(list(devices)):
        target = disk.find("target")
        if disk.tag != "disk" or target is None or target.get("dev") not in sources:
            continue
        dev = target.get("dev", "")
        driver = disk.find("driver")
        fmt = (formats or {}).get(dev) or (driver.get("type", "raw") if driver is not None else "raw")
        new = ET.fromstring(disk_xml(sources[dev], dev, target.get("bus") or _bus_of(dev), fmt or "raw"))
        for keep in ("address", "boot", "serial", "alias"):
            el = disk.find(keep)
            if el is not None:
                new.append(el)
        devices.remove(disk)
        devices.insert(i, new)
    return ET.tostring(root, encoding="unicode")


def for_new_domain(xml: str, name: str, networks: dict[str, str] | None = None) -> str:
    """Recorded domain XML made definable under `name` beside the original: no UUID (libvirt makes a
    new one), the given name; MACs and interface definitions are kept (a recovery domain's
    addresses come back because the guest sees the same NICs), each interface's network mapped
    through `networks` (a test failover's isolated network, the recovery site's own). A file
    console moves to a file of its own beside the original (`NAME.FILE`): both domains may run on
    one host, and a console file is where the VM guest reports its verdict."""
    root = parse(xml)
    for metadata in root.findall("metadata"):
        for own in [el for el in metadata if el.tag.startswith("{" + OWN_METADATA)]:
            metadata.remove(own)  # the original's capture and overlays are its own
    for tag in ("serial", "console"):
        for src in root.findall(f"./devices/{tag}[@type='file']/source"):
            path = src.get("path", "")
            if path:
                folder, _, file = path.rpartition("/")
                src.set("path", f"{folder}/{name}.{file}")
    for src in root.findall("./devices/interface/source"):
        if src.get("network") in (networks or {}):
            src.set("network", (networks or {})[src.get("network", "")])
    for tag in ("uuid", "name"):
        found = root.find(tag)
        if found is not None:
            root.remove(found)
    named = ET.Element("name")
    named.text = name
    root.insert(0, named)
    root.attrib.pop("id", None)
    return ET.tostring(root, encoding="unicode")
