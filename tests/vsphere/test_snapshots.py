"""Snapshots through `VSphereFabric` against vcsim: what a held failover does to its recovery machine.

The recovery machine is snapshotted before it boots; changing the recovery point reverts to that
snapshot and removes it, committing removes it. Each test drives the fabric and reads the result
back through discovery or a separate pyVmomi admin session.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
from pyVmomi import vim, vmodl

from siterecovery.fabrics.base import REQUIRED_PRIVILEGES, FabricError, PowerState, Snapshot
from siterecovery.fabrics.vsphere import VSphereFabric

from .conftest import Vcsim, find

PC = vmodl.query.PropertyCollector

# Grants a role with these privileges to the "readonly" account on one machine.
Grant = Callable[[str, tuple[str, ...]], None]


def listed(fabric: VSphereFabric, machine: str) -> tuple[Snapshot, ...]:
    found = fabric.discover().machine(machine)
    assert found is not None
    return found.snapshots


def snapshot_info(admin_si: Any, machine: str) -> Any:
    """The machine's `snapshot` property read outside the fabric, None when it has none."""
    vm = find(admin_si, vim.VirtualMachine, machine)
    # A property collector read: vcsim's single-property Fetch (`vm.snapshot`) fails when unset.
    spec = PC.FilterSpec(
        objectSet=[PC.ObjectSpec(obj=vm)],
        propSet=[PC.PropertySpec(type=vim.VirtualMachine, pathSet=["snapshot"])],
    )
    (content,) = admin_si.content.propertyCollector.RetrieveContents([spec])
    return next((p.val for p in content.propSet or () if p.name == "snapshot"), None)


def current(admin_si: Any, machine: str) -> str | None:
    """The moId of the machine's current snapshot."""
    info = snapshot_info(admin_si, machine)
    return None if info is None or info.currentSnapshot is None else str(info.currentSnapshot._moId)


def test_created_snapshot_is_listed_with_its_id(vcsim: Vcsim, admin_si: Any, fresh_vm: str) -> None:
    with vcsim.fabric() as fabric:
        made = fabric.create_snapshot(fresh_vm, "before-boot")
        assert made.name == "before-boot" and made.id.startswith("snapshot-")
        assert listed(fabric, fresh_vm) == (made,)
    assert current(admin_si, fresh_vm) == made.id
    (node,) = snapshot_info(admin_si, fresh_vm).rootSnapshotList
    assert node.snapshot._moId == made.id and not node.quiesced


def test_revert_to_the_first_of_two_keeps_both(vcsim: Vcsim, admin_si: Any, fresh_vm: str) -> None:
    with vcsim.fabric() as fabric:
        first = fabric.create_snapshot(fresh_vm, "point-1")
        second = fabric.create_snapshot(fresh_vm, "point-2")
        assert current(admin_si, fresh_vm) == second.id
        fabric.revert_to_snapshot(fresh_vm, first.id)
        assert current(admin_si, fresh_vm) == first.id
        assert listed(fabric, fresh_vm) == (first, second)
        fabric.remove_snapshot(fresh_vm, second.id)
        assert listed(fabric, fresh_vm) == (first,)
        assert current(admin_si, fresh_vm) == first.id


def test_remove_finds_a_snapshot_deep_in_the_tree_and_keeps_its_child(
    vcsim: Vcsim, admin_si: Any, fresh_vm: str
) -> None:
    """first → middle → last: removing the middle one leaves last under first (removeChildren=False)."""
    with vcsim.fabric() as fabric:
        first = fabric.create_snapshot(fresh_vm, "first")
        middle = fabric.create_snapshot(fresh_vm, "middle")
        last = fabric.create_snapshot(fresh_vm, "last")
        fabric.remove_snapshot(fresh_vm, middle.id)
        assert listed(fabric, fresh_vm) == (first, last)
        fabric.revert_to_snapshot(fresh_vm, last.id)
        assert current(admin_si, fresh_vm) == last.id
    (root,) = snapshot_info(admin_si, fresh_vm).rootSnapshotList
    assert [child.snapshot._moId for child in root.childSnapshotList] == [last.id]


def test_change_point_then_commit(vcsim: Vcsim, admin_si: Any, fresh_vm: str) -> None:
    """A held failover: snapshot, boot; change the point (off, revert, remove, snapshot, boot); commit."""
    with vcsim.fabric() as fabric:
        held = fabric.create_snapshot(fresh_vm, "siterecovery-held")
        fabric.power_on(fresh_vm)
        fabric.power_off(fresh_vm)
        fabric.revert_to_snapshot(fresh_vm, held.id)
        fabric.remove_snapshot(fresh_vm, held.id)
        assert listed(fabric, fresh_vm) == () and current(admin_si, fresh_vm) is None
        again = fabric.create_snapshot(fresh_vm, "siterecovery-held")
        assert again.id != held.id and listed(fabric, fresh_vm) == (again,)
        fabric.power_on(fresh_vm)
        fabric.remove_snapshot(fresh_vm, again.id)
        machine = fabric.discover().machine(fresh_vm)
        assert machine is not None and machine.snapshots == () and machine.power_state is PowerState.ON


@pytest.mark.parametrize("with_tree", [True, False], ids=["snapshot-not-found", "snapshot-not-found-none"])
@pytest.mark.parametrize("operation", ["revert", "remove"])
def test_unknown_snapshot_is_refused(vcsim: Vcsim, fresh_vm: str, with_tree: bool, operation: str) -> None:
    with vcsim.fabric() as fabric:
        kept = (fabric.create_snapshot(fresh_vm, "kept"),) if with_tree else ()
        act = fabric.revert_to_snapshot if operation == "revert" else fabric.remove_snapshot
        with pytest.raises(FabricError) as err:
            act(fresh_vm, "snapshot-404")
        assert listed(fabric, fresh_vm) == kept
    assert err.value.code == "snapshot-not-found"
    assert fresh_vm in err.value.message and "snapshot-404" in err.value.message
    assert err.value.remediation.startswith("Rediscover the machine's snapshots")


@pytest.mark.parametrize(
    "act",
    [
        pytest.param(lambda f: f.create_snapshot("no-such-vm", "x"), id="machine-not-found-create"),
        pytest.param(
            lambda f: f.revert_to_snapshot("no-such-vm", "snapshot-1"), id="machine-not-found-revert"
        ),
        pytest.param(lambda f: f.remove_snapshot("no-such-vm", "snapshot-1"), id="machine-not-found-remove"),
    ],
)
def test_unknown_machine_is_refused(vcsim: Vcsim, act: Callable[[VSphereFabric], object]) -> None:
    with vcsim.fabric() as fabric, pytest.raises(FabricError) as err:
        act(fabric)
    assert err.value.code == "machine-not-found" and "no-such-vm" in err.value.message


@pytest.fixture
def grant(admin_si: Any, fresh_vm: str) -> Iterator[Grant]:
    """Gives the "readonly" account an extra role on `fresh_vm`; both are gone afterwards."""
    manager = admin_si.content.authorizationManager
    vm = find(admin_si, vim.VirtualMachine, fresh_vm)
    roles: list[int] = []

    def give(name: str, privileges: tuple[str, ...]) -> None:
        role = manager.AddAuthorizationRole(name=name, privIds=list(privileges))
        roles.append(role)
        permission = vim.AuthorizationManager.Permission(
            principal="readonly", group=False, roleId=role, propagate=True
        )
        manager.SetEntityPermissions(entity=vm, permission=[permission])

    yield give
    manager.RemoveEntityPermission(entity=vm, user="readonly", isGroup=False)
    for role in roles:
        manager.RemoveAuthorizationRole(roleId=role, failIfUsed=False)


@pytest.mark.parametrize(
    "missing",
    [
        pytest.param("VirtualMachine.State.CreateSnapshot", id="rp-perms-create-snapshot"),
        pytest.param("VirtualMachine.State.RevertToSnapshot", id="rp-perms-revert-to-snapshot"),
        pytest.param("VirtualMachine.State.RemoveSnapshot", id="rp-perms-remove-snapshot"),
    ],
)
def test_reduced_role_is_refused_only_what_it_lacks(
    vcsim: Vcsim, fresh_vm: str, grant: Grant, missing: str
) -> None:
    """RP-PERMS: every required privilege but one, on the machine; each granted step works."""
    grant(f"all-but-{missing}", tuple(p for p in REQUIRED_PRIVILEGES if p != missing))
    with vcsim.fabric() as admin:
        point = admin.create_snapshot(fresh_vm, "point")
    steps: list[tuple[str, Callable[[VSphereFabric], object]]] = [
        ("VirtualMachine.State.CreateSnapshot", lambda f: f.create_snapshot(fresh_vm, "another")),
        ("VirtualMachine.State.RevertToSnapshot", lambda f: f.revert_to_snapshot(fresh_vm, point.id)),
        ("VirtualMachine.State.RemoveSnapshot", lambda f: f.remove_snapshot(fresh_vm, point.id)),
    ]
    with vcsim.fabric("readonly") as reduced:
        for privilege, step in steps:
            if privilege != missing:
                step(reduced)
                continue
            with pytest.raises(FabricError) as err:
                step(reduced)
            assert err.value.code == "vcenter-insufficient-privileges"
            assert missing in err.value.message and missing in err.value.remediation
        names = [s.name for s in listed(reduced, fresh_vm)]
    # The refused step changed nothing: creating adds "another", removing takes "point" away.
    expected = {
        "VirtualMachine.State.CreateSnapshot": [],
        "VirtualMachine.State.RevertToSnapshot": ["another"],
        "VirtualMachine.State.RemoveSnapshot": ["point", "another"],
    }[missing]
    assert names == expected


def test_read_only_account_cannot_snapshot(vcsim: Vcsim, fresh_vm: str) -> None:
    with vcsim.fabric("readonly") as fabric, pytest.raises(FabricError) as err:
        fabric.create_snapshot(fresh_vm, "x")
    assert err.value.code == "vcenter-insufficient-privileges"
    assert "VirtualMachine.State.CreateSnapshot" in err.value.message
