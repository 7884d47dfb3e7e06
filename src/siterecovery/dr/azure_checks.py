"""Prerequisites of a failover to an Azure site: what ARM would refuse, found before anything is made.

A failover creates one VM per machine (the fabric's VM size), one managed disk per replica disk,
imported from its fixed-VHD page blob. ARM refuses a VM size the region does not offer, more data
disks than the size takes, a VHD that is not a whole number of MiB (or beyond 32 TiB), and cores
beyond the subscription's regional quota, but only after earlier disks and VMs were created; these
checks run every rule at once against `AzureCapacity` (read from ARM by the fabric) and return one
problem per failing rule, through the same registry as the reprotect checks (`dr.rules`).
"""

from __future__ import annotations

from collections.abc import Sequence

from siterecovery.dr import rules
from siterecovery.errors import Problem
from siterecovery.fabrics.azure_arm import ArmConnection, AzureCapacity
from siterecovery.fabrics.base import Machine

MiB = 1 << 20
MAX_DISK = 32 << 40  # the largest managed disk an imported VHD may become
CORES = "cores"  # the regional total of all VM families (ARM's usage name)

SAS_MIN, SAS_MAX = 30, 60 * 24 * 3600  # what ARM's grant_access accepts for a disk or snapshot

# Checked at enable (the duration) and before a reprotect or failback from Azure (both).
AZURE_FAILBACK_RULES: tuple[rules.Rule, ...] = (rules.AZURE_SAS_DURATION, rules.AZURE_SAS_ACTIVE)
# Checked before a reprotect from Azure through an agent in the recovery VM (`--agent`) only.
AZURE_AGENT_RULES: tuple[rules.Rule, ...] = (rules.AZURE_ONPREM_ROUTE,)

AZURE_FAILOVER_RULES: tuple[rules.Rule, ...] = (
    rules.AZURE_REGION,
    rules.AZURE_VM_SIZE,
    rules.AZURE_DISK_COUNT,
    rules.AZURE_DISK_ALIGNMENT,
    rules.AZURE_CORE_QUOTA,
)


def check_azure_failover(capacity: AzureCapacity, machines: Sequence[Machine], vm_size: str) -> list[Problem]:
    """Every failing rule for failing `machines` over as VMs of `vm_size`; empty when none fails."""
    problems: list[Problem] = []
    size = next((s for s in capacity.sizes if s.name.lower() == vm_size.lower()), None)
    if not capacity.sizes:  # no VM can go there at all: the region, not the size, is wrong
        problems.append(
            rules.AZURE_REGION.problem(
                f"The subscription can create no VMs in region {capacity.location!r} (ARM lists no VM "
                "sizes there).",
                location=capacity.location,
            )
        )
    elif size is None:
        problems.append(
            rules.AZURE_VM_SIZE.problem(
                f"Region {capacity.location} does not offer VM size {vm_size}.", location=capacity.location
            )
        )
    for m in machines:
        data_disks = max(len(m.disks) - 1, 0)
        if size is not None and data_disks > size.max_data_disks:
            problems.append(
                rules.AZURE_DISK_COUNT.problem(
                    f"Machine {m.name} has {data_disks} data disks; VM size {size.name} takes "
                    f"{size.max_data_disks}.",
                    machine=m.name,
                    needed=str(data_disks),
                )
            )
        for d in m.disks:
            if d.size_bytes % MiB or d.size_bytes > MAX_DISK:
                problems.append(
                    rules.AZURE_DISK_ALIGNMENT.problem(
                        f"Disk {d.label} of {m.name} is {d.size_bytes} bytes, not a whole number of MiB "
                        "up to 32 TiB.",
                        machine=m.name,
                        disk=d.label,
                    )
                )
    cores = next((u for u in capacity.usages if u.name == CORES), None)
    if size is not None and cores is not None:
        needed = cores.current + size.cores * len(machines)
        if needed > cores.limit:
            problems.append(
                rules.AZURE_CORE_QUOTA.problem(
                    f"Failing over {len(machines)} machine(s) as {size.name} needs {needed} cores in "
                    f"{capacity.location}; the subscription's quota there is {cores.limit}.",
                    location=capacity.location,
                    needed=str(needed),
                )
            )
    return problems


def check_sas(seconds: int, active: Sequence[str] = ()) -> list[Problem]:
    """AZ-SAS and AZ-SAS-ACTIVE: the SAS duration failback asks for, and `active`, the recovery VM's
    disks and failback snapshots already being read through a SAS."""
    problems: list[Problem] = []
    if not SAS_MIN <= seconds <= SAS_MAX:
        problems.append(
            rules.AZURE_SAS_DURATION.problem(
                f"The fabric's SAS duration is {seconds} s; ARM grants read access for "
                f"{SAS_MIN} s to 60 days.",
                seconds=str(seconds),
            )
        )
    for name in active:
        problems.append(
            rules.AZURE_SAS_ACTIVE.problem(
                f"{name} is already being read through a SAS (ActiveSAS).", resource=name
            )
        )
    return problems


def check_onprem_route(connections: Sequence[ArmConnection], subnet_id: str) -> list[Problem]:
    """AZ-VPN: the recovery subnet's virtual network has a Connected gateway connection."""
    vnet = subnet_id.split("/subnets/")[0]
    mine = [c for c in connections if c.vnet_id.lower() == vnet.lower()]
    if any(c.status == "Connected" for c in mine):
        return []
    seen = ", ".join(f"{c.name} {c.status}" for c in mine) or "none"
    name = vnet.rstrip("/").rsplit("/", 1)[-1] or "(no recovery network)"
    return [
        rules.AZURE_ONPREM_ROUTE.problem(
            f"The recovery network {name} has no Connected site-to-site connection to the on-premises "
            f"site (connections: {seen}).",
            network=name,
        )
    ]
