"""The facts prerequisite checks share, resolved once from a situation.

Several rules look at the same things (the master target's VM and host, the datastores on that
host, the on-premises VM failback writes into, the host failed back to); `resolve` finds each once
so the rules agree on them. Package-internal to `dr`.
"""

from __future__ import annotations

from dataclasses import dataclass

from siterecovery.dr.check_inputs import ReprotectContext, Situation
from siterecovery.fabrics.base import Datastore, Host, Machine


@dataclass(frozen=True)
class Facts:
    """What every check needs, resolved once from a situation; None where it cannot be known."""

    ctx: Situation
    reprotect: ReprotectContext | None  # None when checking failback
    mt_name: str
    ps_name: str
    mt_vm: Machine | None  # the master target's VM in the on-premises inventory
    mt_host: Host | None
    host_datastores: tuple[Datastore, ...]  # datastores mounted on the master target's host
    existing_vm: Machine | None  # the on-premises VM failback writes into, if it still exists
    cloud_vm: Machine | None
    target_host: str  # host failed back to: the existing VM's, else the master target's


def resolve(ctx: Situation) -> Facts:
    req = ctx if isinstance(ctx, ReprotectContext) else None
    mt_name = req.request.master_target if req else ctx.item.master_target
    ps_name = req.request.process_server if req else ctx.item.process_server
    onprem = ctx.onprem
    mt_vm = onprem.machine(ctx.master_target.machine) if onprem and ctx.master_target else None
    mt_host = onprem.host(mt_vm.host) if onprem and mt_vm else None
    host_datastores = (
        tuple(d for d in onprem.datastores if d.mounted_on(mt_host.name)) if onprem and mt_host else ()
    )
    # A physical server has no VM to write into: it always fails back as a new VM on the MT's host.
    original = onprem.machine(ctx.item.machine) if onprem else None
    existing_vm = original if original and not ctx.item.physical else None
    new_vm_host = mt_host.name if mt_host else ""
    target_host = existing_vm.host if existing_vm else new_vm_host
    return Facts(
        ctx=ctx,
        reprotect=req,
        mt_name=mt_name,
        ps_name=ps_name,
        mt_vm=mt_vm,
        mt_host=mt_host,
        host_datastores=host_datastores,
        existing_vm=existing_vm,
        cloud_vm=ctx.cloud.machine(ctx.item.cloud_machine),
        target_host=target_host,
    )
