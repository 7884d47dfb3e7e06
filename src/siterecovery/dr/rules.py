"""The registry of reprotect and failback prerequisite rules: one place per code and remediation.

Each `Rule` ties a REQUIREMENTS.md ID to its stable error code, a line on what is checked (used by
`docs/prerequisites.md`) and a remediation template. Checks build problems only through
`Rule.problem`, so a code or remediation is never spelled twice. A requirement ID may own more
than one code (RP-VCENTER: the vCenter and the master target), so `RULES` is keyed by code.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from siterecovery.errors import Problem

# Most disks one master target may have attached at once: its VM's SCSI slots (4 controllers x 15).
MAX_MT_DISKS = 60


@dataclass(frozen=True)
class Rule:
    id: str  # REQUIREMENTS.md ID
    code: str  # stable error code
    checked: str  # what is checked, one sentence (documentation)
    remediation: str  # a sentence; str.format template over the problem's fields

    def problem(self, message: str, **fields: str) -> Problem:
        """A problem for this rule; `fields` fill the remediation and travel as `detail`."""
        return Problem(
            code=self.code,
            message=message,
            remediation=self.remediation.format(**fields),
            rule=self.id,
            detail=dict(fields),
        )

    def refusal(self, message: str, remediation: str) -> Problem:
        """A problem with this rule's code and ID, and a remediation that fits where it is found
        rather than the registry's template (at enable, before any pair exists; at a task)."""
        return Problem(code=self.code, message=message, remediation=remediation, rule=self.id)


CS_UNKNOWN_MACHINE = Rule(
    "CS-1",
    "cs-unknown-machine",
    "The configuration server's database still holds the record of the on-premises machine.",
    "Restore the configuration server from a backup taken after {machine} was protected "
    "(it keeps its identity and address), then retry.",
)
CS_UNREACHABLE = Rule(
    "CS-2",
    "cs-unreachable",
    "The master target reaches the configuration server: its last heartbeat is within the "
    "heartbeat timeout (the process server's is RP-PS, the agent's RP-REACH).",
    "Make sure the configuration server is running and that master target {master_target} can "
    "reach its API port, then retry once its heartbeat resumes.",
)
MT_OS_MISMATCH = Rule(
    "MT-2",
    "mt-os-mismatch",
    "The master target's OS type is the machine's OS type.",
    "Choose a {os_type} master target for {machine}, or deploy one.",
)
MT_DISK_LIMIT = Rule(
    "MT-3",
    "mt-disk-limit",
    f"Disks on the master target's VM, plus those other running requests and this one add, "
    f"stay at most {MAX_MT_DISKS}.",
    "Choose a master target with {needed} free disk slots, or deploy another master target.",
)
AGENT_NOT_REGISTERED = Rule(
    "AG-1",
    "agent-not-registered",
    "The mobility agent of the failed-over machine has registered again since it booted in the cloud.",
    "Retry in a few minutes: an agent can take up to 15 minutes to register after {machine} boots.",
)
DISK_UUID_CLASH = Rule(
    "RP-UUID",
    "disk-uuid-clash",
    "No disk of the on-premises machine has the UUID of a disk of the master target.",
    "Use a master target that was not made from the same template as {machine}.",
)
VCENTER_NOT_DISCOVERED = Rule(
    "RP-VCENTER",
    "vcenter-not-discovered",
    "The target vCenter (original or alternate) has been discovered by the configuration server.",
    "Add vCenter {vcenter} to the configuration server (or refresh it), then retry.",
)
MT_NOT_DISCOVERED = Rule(
    "RP-VCENTER",
    "mt-not-discovered",
    "The master target is registered and its VM and host are in the discovered vCenter inventory.",
    "Register master target {master_target} and make sure its VM is managed by vCenter {vcenter}, "
    "refresh the vCenter, then retry.",
)
DATASTORES_NOT_VISIBLE = Rule(
    "RP-DATASTORES",
    "datastores-not-visible",
    "Discovery sees at least one datastore on the master target's host (a read-only vCenter "
    "account sees none).",
    "Update the credentials of vCenter {vcenter} to an account that can browse datastores, "
    "refresh the vCenter, then retry.",
)
VCENTER_INSUFFICIENT_PRIVILEGES = Rule(
    "RP-PERMS",
    "vcenter-insufficient-privileges",
    "The vCenter account holds every privilege for discovery, creating VMs, attaching disks and "
    "power operations.",
    "Grant the vCenter {vcenter} account {missing}, refresh the vCenter, then retry.",
)
SOURCE_UNREACHABLE = Rule(
    "RP-REACH",
    "source-unreachable",
    "The failed-over machine's agent reaches the configuration server: its last heartbeat is "
    "within the heartbeat timeout.",
    "Make sure {machine} can reach the configuration server and the process server (site-to-site "
    "VPN or private peering, ports open), then retry.",
)
PS_DISCONNECTED = Rule(
    "RP-PS",
    "ps-disconnected",
    "The chosen process server is registered and its last heartbeat is within the heartbeat timeout.",
    "Choose a connected process server, or make sure {process_server} runs and reaches the "
    "configuration server, then retry.",
)
MT_HAS_SNAPSHOTS = Rule(
    "RP-MT-SNAP",
    "mt-has-snapshots",
    "The master target's VM has no snapshots.",
    "Delete the snapshots of master target {master_target}, then retry.",
)
GROUP_MIXED_OS = Rule(
    "RP-GROUP-OS",
    "group-mixed-os",
    "Every machine of the replication group has the item's OS type.",
    "Keep machines of one OS type only in replication group {group}, then retry.",
)
GROUP_MIXED_MT = Rule(
    "RP-GROUP-MT",
    "group-mixed-mt",
    "Every machine of the replication group is given the same master target.",
    "Give every machine of replication group {group} master target {master_target}.",
)
GROUP_NEEDS_RECOVERY_PLAN = Rule(
    "RP-GROUP-PLAN",
    "group-needs-recovery-plan",
    "A member of a replication group is reprotected through a recovery plan that gives values "
    "for every member.",
    "Reprotect replication group {group} through a recovery plan that gives values for every machine in it.",
)
MT_ON_LVM = Rule(
    "RP-MT-LVM",
    "mt-on-lvm",
    "A Linux master target is not installed on LVM.",
    "Use a Linux master target whose file systems are not on LVM.",
)
DATASTORE_NOT_WRITABLE = Rule(
    "RP-MT-RW",
    "datastore-not-writable",
    "When the on-premises machine still exists, each datastore holding its disks is mounted "
    "read/write on the master target's host.",
    "Mount {datastores} read/write on host {host}, refresh the vCenter, then retry.",
)
MT_DISKS_MOVED = Rule(
    "RP-MT-MOVE",
    "mt-disks-moved",
    "(Failback) every disk reprotect attached to the master target is still attached at the "
    "place it was put.",
    "Find the disks ({disks}), attach them to {machine} and boot it; exclude master target "
    "{master_target} from Storage vMotion and DRS.",
)
RETENTION_VOLUME_INELIGIBLE = Rule(
    "RP-RET",
    "retention-volume-ineligible",
    "The chosen retention volume (default R: on Windows, /mnt/retention on Linux) is a volume of "
    "the master target that meets every eligibility criterion.",
    "Choose an eligible retention volume of master target {master_target} ({eligible}), or add a "
    "volume and refresh the master target.",
)
MT_TOOLS_MISSING = Rule(
    "RP-MT-TOOLS",
    "mt-tools-missing",
    "VMware Tools or open-vm-tools run on the master target.",
    "Install and start VMware Tools or open-vm-tools on master target {master_target}, then retry.",
)
MT_ENABLEUUID_MISSING = Rule(
    "RP-MT-UUIDCFG",
    "mt-enableuuid-missing",
    "disk.EnableUUID=true is set on the master target's VM.",
    "Add disk.EnableUUID=true to the configuration parameters of master target {master_target}, then retry.",
)
MT_HOST_NO_VMFS = Rule(
    "RP-MT-VMFS",
    "mt-host-no-vmfs",
    "The master target's host has at least one VMFS datastore.",
    "Attach a VMFS datastore to host {host}, or use a master target on a host that has one.",
)
MT_PARAVIRTUAL_CONTROLLER = Rule(
    "RP-MT-SCSI",
    "mt-paravirtual-controller",
    "Every SCSI controller of the master target is LSI Logic.",
    "Replace the ParaVirtual SCSI controller of master target {master_target} with an LSI Logic one.",
)
HOST_FREE_EDITION = Rule(
    "RP-ESXI-FREE",
    "host-free-edition",
    "The host failed back to (the existing machine's, else the master target's) is not a "
    "free-edition hypervisor.",
    "Apply an evaluation or paid licence to host {host}, then retry.",
)
OS_NOT_FAILBACK_CAPABLE = Rule(
    "RP-W2K8",
    "os-not-failback-capable",
    "The machine is not Windows Server 2008 R2 (SP1) protected as a physical server.",
    "Keep {machine} in the cloud or rebuild it on-premises: this OS protected as a physical "
    "server cannot be failed back.",
)
NOT_FAILBACK_ELIGIBLE = Rule(
    "RP-ELIGIBLE",
    "not-failback-eligible",
    "The machine was failed over for DR (not migrated or created in the cloud), is still in its "
    "resource group, its cloud VM exists and its protection is enabled.",
    "Protect {machine} anew from where it runs: only machines failed over from on-premises for "
    "disaster recovery can be failed back.",
)
TARGET_NOT_ESXI = Rule(
    "RP-ESXI-ONLY",
    "target-not-esxi",
    "The host failed back to is an ESXi host (not Hyper-V, physical or a desktop hypervisor).",
    "Fail {machine} back to an ESXi host: use a master target that runs on ESXi.",
)
DATASTORE_REQUIRED = Rule(
    "RP-DATASTORE-ARG",
    "datastore-required",
    "A datastore is given; when a new machine will be created it is mounted read/write on the "
    "master target's host.",
    "Give a datastore mounted read/write on the master target's host ({choices}).",
)
NOT_FAILED_OVER = Rule(
    "RPW-2",
    "not-failed-over",
    "(Reprotect) the item's state is failover-committed: it runs in the cloud after a committed failover.",
    "Reprotect applies to {machine} only after a failover to the cloud has been committed.",
)
NOT_REPROTECTED = Rule(
    "RPW-7",
    "not-reprotected",
    "(Failback) the item is protected in the failback direction (cloud-to-onprem).",
    "Reprotect {machine} and wait until it is protected in the failback direction, then fail it back.",
)

# Failover to an Azure site (dr/azure_checks.py). Reaching the on-premises configuration server from
# the Azure network (the seed's site-to-site VPN rule) is RP-REACH and CS-2, checked by heartbeats.
AZURE_VM_SIZE = Rule(
    "AZ-SIZE",
    "azure-vm-size-unavailable",
    "(Failover to Azure) the region offers the VM size the fabric creates failed-over VMs with.",
    "Choose a VM size offered in {location} (`fabrics add azure --vm-size`), or use another region.",
)
AZURE_DISK_COUNT = Rule(
    "AZ-DISKS",
    "azure-too-many-disks",
    "(Failover to Azure) the VM size takes the machine's data disks.",
    "Choose a VM size taking at least {needed} data disks for {machine}.",
)
AZURE_DISK_ALIGNMENT = Rule(
    "AZ-DISK-SIZE",
    "azure-disk-size-unsupported",
    "(Failover to Azure) each disk is a whole number of MiB and at most 32 TiB (what a managed disk "
    "imported from a VHD can be).",
    "Resize disk {disk} of {machine} to a whole number of MiB (at most 32 TiB) and resynchronise it.",
)
AZURE_CORE_QUOTA = Rule(
    "AZ-QUOTA",
    "azure-core-quota",
    "(Failover to Azure) the subscription's core quota in the region leaves room for the failed-over VMs.",
    "Ask for a core quota of at least {needed} in {location}, or fail over fewer machines at once.",
)
AZURE_REGION = Rule(
    "AZ-REGION",
    "azure-region-unavailable",
    "(Failover to Azure) the fabric's location is a region where the subscription can create VMs "
    "(ARM lists VM sizes there; an unknown region, or one not enabled for the subscription, lists none).",
    "Add the Azure fabric again with a --location the subscription can use (`az account list-locations`); "
    "{location} is not one.",
)
AZURE_ONPREM_ROUTE = Rule(
    "AZ-VPN",
    "azure-onprem-unreachable",
    "(Agent-based failback from Azure; RP-REACH) the recovery network routes to the on-premises site: "
    "its virtual network's gateway has a site-to-site connection in state Connected (the seed's VPN). "
    "Agentless failback reads the disks over SAS and does not need it.",
    "Connect the gateway of {network} to the on-premises VPN device (a Connected site-to-site "
    "connection), or reprotect agentless (the default: without `--agent`).",
)
AZURE_SAS_DURATION = Rule(
    "AZ-SAS",
    "azure-sas-duration",
    "(Failback from Azure) the read access (SAS) failback asks ARM for on a disk or snapshot lasts "
    "between 30 seconds and 60 days (what `grant_access` accepts).",
    "Set the fabric's SAS duration between 30 and 5184000 seconds (`fabrics add azure --sas-seconds`); "
    "it is {seconds} s now.",
)
AZURE_SAS_ACTIVE = Rule(
    "AZ-SAS-ACTIVE",
    "azure-sas-active",
    "(Failback from Azure) no disk or failback snapshot of the recovery VM is already being read "
    "through a SAS (ARM state ActiveSAS): such a disk cannot be started or exported again.",
    "End the other export of {resource} (`az disk revoke-access` / `az snapshot revoke-access`), then retry.",
)

# Failover, reprotect and failback onto a libvirt site (dr/libvirt_checks.py): what libvirt would
# refuse or get wrong, found before anything is defined.
LIBVIRT_REACH = Rule(
    "LV-REACH",
    "libvirt-unreachable",
    "(libvirt) the target host answers at the fabric's URI.",
    "Start libvirtd (or virtqemud) on {host} and check the URI and SSH access (`virsh -c {uri} version`).",
)
LIBVIRT_POOL = Rule(
    "LV-POOL",
    "libvirt-pool-unavailable",
    "(libvirt) the storage pool for the replica volumes exists, is active and is writable on the host.",
    "Define and start pool {pool} on {host} (`virsh pool-start {pool}`), writable by libvirtd.",
)
LIBVIRT_POOL_SPACE = Rule(
    "LV-POOL-SPACE",
    "libvirt-pool-full",
    "(libvirt) the storage pool has room for the replica volumes.",
    "Free {needed} bytes in pool {pool} or choose a larger pool.",
)
LIBVIRT_NAME = Rule(
    "LV-NAME",
    "libvirt-name-taken",
    "(libvirt) no other domain on the host has the name the recovery domain will get.",
    "Undefine or rename domain {machine} on {host}, or recover under another name.",
)
LIBVIRT_SNAPSHOTS = Rule(
    "LV-SNAPSHOT",
    "libvirt-snapshots-present",
    "(libvirt) the master target domain has no snapshots (a revert restores its old disk list and "
    "drops the replica disks attached since).",
    "Delete the snapshots of {machine} (`virsh snapshot-delete`).",
)
LIBVIRT_DISK_LIMIT = Rule(
    "LV-DISKS",
    "libvirt-disk-limit",
    "(libvirt) the master target domain's bus takes the replica disks beside those it has.",
    "Detach disks from {machine} or use another master target ({needed} {bus} disks needed).",
)
LIBVIRT_DOMAIN_TYPE = Rule(
    "LV-TYPE",
    "libvirt-domain-type-unsupported",
    "(libvirt) the target host runs the domain type and architecture of the recorded domain XML.",
    "Run {machine} on a host offering {needed}, or change the domain type in its record.",
)
LIBVIRT_NETWORK = Rule(
    "LV-NETWORK",
    "libvirt-network-missing",
    "(libvirt) the networks the domain's interfaces use exist and are active on the target host.",
    "Define and start network {network} on {host} (`virsh net-start {network}`).",
)
# Protecting a libvirt domain (enable, reprotect from a libvirt site): its disks become the exports
# of the machine's agent (dr/libvirt_capture.py).
LIBVIRT_CAPTURE = Rule(
    "LV-CAPTURE",
    "libvirt-capture-not-served",
    "(protect a libvirt domain) the machine's agent serves each of its disks' volumes over a Unix "
    "socket on the host, so the domain's disk can become the agent's export.",
    "Start the agent of {machine} on its host with --disk {disk}={volume} and --nbd-unix-dir DIR, "
    "then retry.",
)

RULES: Mapping[str, Rule] = {
    rule.code: rule
    for rule in (
        CS_UNKNOWN_MACHINE,
        CS_UNREACHABLE,
        MT_OS_MISMATCH,
        MT_DISK_LIMIT,
        AGENT_NOT_REGISTERED,
        DISK_UUID_CLASH,
        VCENTER_NOT_DISCOVERED,
        MT_NOT_DISCOVERED,
        DATASTORES_NOT_VISIBLE,
        VCENTER_INSUFFICIENT_PRIVILEGES,
        SOURCE_UNREACHABLE,
        PS_DISCONNECTED,
        MT_HAS_SNAPSHOTS,
        GROUP_MIXED_OS,
        GROUP_MIXED_MT,
        GROUP_NEEDS_RECOVERY_PLAN,
        MT_ON_LVM,
        DATASTORE_NOT_WRITABLE,
        MT_DISKS_MOVED,
        RETENTION_VOLUME_INELIGIBLE,
        MT_TOOLS_MISSING,
        MT_ENABLEUUID_MISSING,
        MT_HOST_NO_VMFS,
        MT_PARAVIRTUAL_CONTROLLER,
        HOST_FREE_EDITION,
        OS_NOT_FAILBACK_CAPABLE,
        NOT_FAILBACK_ELIGIBLE,
        TARGET_NOT_ESXI,
        DATASTORE_REQUIRED,
        NOT_FAILED_OVER,
        NOT_REPROTECTED,
        AZURE_VM_SIZE,
        AZURE_DISK_COUNT,
        AZURE_DISK_ALIGNMENT,
        AZURE_CORE_QUOTA,
        AZURE_REGION,
        AZURE_SAS_DURATION,
        AZURE_SAS_ACTIVE,
        AZURE_ONPREM_ROUTE,
        LIBVIRT_REACH,
        LIBVIRT_POOL,
        LIBVIRT_POOL_SPACE,
        LIBVIRT_NAME,
        LIBVIRT_SNAPSHOTS,
        LIBVIRT_DISK_LIMIT,
        LIBVIRT_DOMAIN_TYPE,
        LIBVIRT_NETWORK,
        LIBVIRT_CAPTURE,
    )
}
