"""Prerequisites of moving domains onto a libvirt site: every failing rule found at once, up front.

A failover (or reprotect, or failback) onto a libvirt host writes one replica volume per disk into
a storage pool, attaches them to the master target domain and, on failover, defines the recovery
domain from the protected domain's recorded XML. libvirt would refuse a missing or stopped pool,
a pool without room, a name another domain has, a domain type or architecture the host does not
run and an interface on a network the host lacks, but only one at a time and after earlier
volumes were made; a master target with snapshots would silently lose attached replica disks on
a revert. These checks read only the target's discovered `Inventory` and the recorded domains
and return one problem per failing rule and object, through the registry in `dr.rules`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from siterecovery.dr import rules
from siterecovery.errors import Problem
from siterecovery.fabrics import libvirt_xml as lx
from siterecovery.fabrics.base import Fabric, FabricError, Inventory, Machine

LIBVIRT_RULES: tuple[rules.Rule, ...] = (
    rules.LIBVIRT_REACH,
    rules.LIBVIRT_POOL,
    rules.LIBVIRT_POOL_SPACE,
    rules.LIBVIRT_NAME,
    rules.LIBVIRT_SNAPSHOTS,
    rules.LIBVIRT_DISK_LIMIT,
    rules.LIBVIRT_DOMAIN_TYPE,
    rules.LIBVIRT_NETWORK,
)


@dataclass(frozen=True)
class RecordedDomain:
    """A protected domain as recorded at protection: its inventory value and its persistent XML."""

    machine: Machine
    xml: str
    recovery_name: str = ""  # the name the recovery domain gets; default the domain's own

    @property
    def name(self) -> str:
        return self.recovery_name or self.machine.name


@dataclass(frozen=True)
class LibvirtTarget:
    uri: str
    pool: str
    master_target: str = ""  # the domain replica volumes are attached to; "" = none (volumes only)


def check_unreachable(target: LibvirtTarget, host: str, why: str) -> list[Problem]:
    return [
        rules.LIBVIRT_REACH.problem(
            f"libvirt at {target.uri} does not answer: {why}", host=host, uri=target.uri
        )
    ]


def check_libvirt_site(
    fabric: Fabric, target: LibvirtTarget, domains: Sequence[RecordedDomain]
) -> list[Problem]:
    """Discover the target site live and check it; a host that does not answer is LV-REACH alone
    (nothing else can be known about it)."""
    try:
        inventory = fabric.discover()
    except FabricError as exc:
        if exc.code != rules.LIBVIRT_REACH.code:
            raise
        rest = target.uri.split("://", 1)[-1]
        host = rest.split("/", 1)[0].rsplit("@", 1)[-1] or "this host"
        return check_unreachable(target, host, exc.message)
    return check_libvirt_target(inventory, target, domains)


def check_libvirt_target(
    inventory: Inventory, target: LibvirtTarget, domains: Sequence[RecordedDomain]
) -> list[Problem]:
    """Every failing rule for moving `domains` onto the site `inventory` describes; empty when none fails."""
    host = inventory.hosts[0] if inventory.hosts else None
    host_name = host.name if host else target.uri
    problems: list[Problem] = []
    pool = inventory.datastore(target.pool)
    if pool is None or not pool.accessible or not pool.writable_on(host_name):
        state = (
            "does not exist"
            if pool is None
            else "is not active"
            if not pool.accessible
            else "is not writable"
        )
        problems.append(
            rules.LIBVIRT_POOL.problem(
                f"Storage pool {target.pool} on {host_name} {state}.", pool=target.pool, host=host_name
            )
        )
    needed = sum(d.size_bytes for r in domains for d in r.machine.disks)
    if pool is not None and pool.accessible and needed > pool.free_bytes:
        problems.append(
            rules.LIBVIRT_POOL_SPACE.problem(
                f"The replica volumes need {needed} bytes; pool {target.pool} has {pool.free_bytes} free.",
                pool=target.pool,
                needed=str(needed - pool.free_bytes),
            )
        )
    for r in domains:
        existing = next((m for m in inventory.machines if m.name == r.name), None)
        if existing is not None and existing.bios_uuid != r.machine.bios_uuid:
            problems.append(
                rules.LIBVIRT_NAME.problem(
                    f"Domain name {r.name} is taken on {host_name} by another domain ({existing.id}).",
                    machine=r.name,
                    host=host_name,
                )
            )
        root = lx.parse(r.xml)
        os_type = root.find("./os/type")
        wanted = (
            f"{os_type.get('arch', 'x86_64') if os_type is not None else 'x86_64'}/{root.get('type', 'kvm')}"
        )
        if host is not None and wanted not in host.domain_types:
            problems.append(
                rules.LIBVIRT_DOMAIN_TYPE.problem(
                    f"Domain {r.name} is a {wanted} domain; {host_name} runs {', '.join(host.domain_types)}.",
                    machine=r.name,
                    needed=wanted,
                )
            )
        networks = {n.name: n for n in inventory.networks}
        for nic in lx.nics(root):
            net = networks.get(nic.network)
            if nic.network and (net is None or not net.active):
                problems.append(
                    rules.LIBVIRT_NETWORK.problem(
                        f"Interface {nic.mac or nic.name} of {r.name} uses network {nic.network}, which "
                        f"{host_name} {'lacks' if net is None else 'has stopped'}.",
                        network=nic.network,
                        host=host_name,
                    )
                )
    mt = inventory.machine(target.master_target) if target.master_target else None
    if mt is not None:
        if mt.snapshots:
            problems.append(
                rules.LIBVIRT_SNAPSHOTS.problem(
                    f"Master target {mt.name} has {len(mt.snapshots)} snapshot(s).", machine=mt.name
                )
            )
        for bus in sorted({d.bus or "virtio" for r in domains for d in r.machine.disks}):
            adding = sum(1 for r in domains for d in r.machine.disks if (d.bus or "virtio") == bus)
            total = adding + sum(1 for d in mt.disks if d.bus == bus)
            if total > lx.BUS_LIMITS.get(bus, 28):
                problems.append(
                    rules.LIBVIRT_DISK_LIMIT.problem(
                        f"Master target {mt.name} would have {total} {bus} disks; the bus takes "
                        f"{lx.BUS_LIMITS.get(bus, 28)}.",
                        machine=mt.name,
                        needed=str(total),
                        bus=bus,
                    )
                )
    return problems
