"""What reprotect will do that does not block it: the tasks `--what-if` shows beside the problems.

Snapshots on the on-premises machine (RP-VM-SNAP) do not block reprotect: the job merges them. The
machine is powered off if it runs (RPW-5), or made anew on the master target's host when it is
gone (RPW-6). `plan_notes` reads the same situation as the checks.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from siterecovery.dr.check_inputs import ReprotectContext
from siterecovery.dr.facts import resolve
from siterecovery.fabrics.base import PowerState


class TaskKind(StrEnum):
    POWER_OFF = "power-off"  # RPW-5: the on-prem machine stays off while the MT writes its disks
    CONSOLIDATE_SNAPSHOTS = "consolidate-snapshots"  # RP-VM-SNAP
    CREATE_MACHINE = "create-machine"  # RPW-6: the machine is gone, a new one is made


@dataclass(frozen=True)
class PlannedTask:
    """Something that does not block reprotect but that its job will do, for `--what-if`."""

    kind: TaskKind
    rule: str
    machine: str
    message: str


def plan_notes(ctx: ReprotectContext) -> list[PlannedTask]:
    """The non-blocking tasks reprotect of `ctx.item` implies, given the inventory as it is now."""
    f = resolve(ctx)
    vm, item = f.existing_vm, ctx.item
    if vm is None:
        where = f" on host {f.mt_host.name}" if f.mt_host else ""
        datastore = ctx.request.datastore or "the chosen datastore"
        why = "is a physical server" if item.physical else "no longer exists on-premises"
        return [
            PlannedTask(
                TaskKind.CREATE_MACHINE,
                "RPW-6",
                item.machine,
                f"Machine {item.machine} {why}: a new VM is created{where} in {datastore} and its "
                "disks are copied in full.",
            )
        ]
    tasks: list[PlannedTask] = []
    if vm.power_state is PowerState.ON:
        tasks.append(
            PlannedTask(
                TaskKind.POWER_OFF,
                "RPW-5",
                vm.name,
                f"Machine {vm.name} is powered off; it must stay off until failback.",
            )
        )
    if vm.snapshots:
        tasks.append(
            PlannedTask(
                TaskKind.CONSOLIDATE_SNAPSHOTS,
                "RP-VM-SNAP",
                vm.name,
                f"The {len(vm.snapshots)} snapshot(s) of machine {vm.name} are merged into its disks.",
            )
        )
    return tasks
