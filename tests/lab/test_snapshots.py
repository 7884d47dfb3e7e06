"""Lab snapshots are real: a revert undoes what the running machine wrote (before-image logs)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from siterecovery.dataplane.before_image import log_path
from siterecovery.fabrics.base import FabricError
from siterecovery.lab import runtime
from siterecovery.lab.fabric import LabFabric
from tests.conftest import data_extents

from .conftest import Lab, wait_records


def _disk(fabric: LabFabric, machine: str = "web1") -> Path:
    found = fabric.discover().machine(machine)
    assert found is not None
    return Path(found.disks[0].backing)


def test_revert_undoes_what_the_running_machine_wrote(lab: Lab) -> None:
    fabric = lab.fabric()
    disk = _disk(fabric)
    fabric.power_on("web1")
    wait_records(lab, "web1", 20)  # some history before the snapshot
    fabric.power_off("web1")
    before, extents = disk.read_bytes(), data_extents(disk)

    snap = fabric.create_snapshot("web1", "before-boot")
    assert fabric.discover().machine("web1").snapshots == (snap,)  # type: ignore[union-attr]
    for _ in range(2):  # a revert keeps the snapshot, which preserves again from then on
        fabric.power_on("web1")
        wait_records(lab, "web1", 120)
        fabric.power_off("web1")
        assert disk.read_bytes() != before
        fabric.revert_to_snapshot("web1", snap.id)
        assert disk.read_bytes() == before
        assert data_extents(disk) == extents

    fabric.remove_snapshot("web1", snap.id)
    assert not log_path(disk).exists()
    assert fabric.discover().machine("web1").snapshots == ()  # type: ignore[union-attr]


def test_removing_the_snapshot_while_running_keeps_every_write(lab: Lab) -> None:
    fabric = lab.fabric()
    disk = _disk(fabric)
    snap = fabric.create_snapshot("web1", "s")
    fabric.power_on("web1")
    wait_records(lab, "web1", 30)
    fabric.remove_snapshot("web1", snap.id)  # commit while the machine runs
    assert not log_path(disk).exists()
    flushed = wait_records(lab, "web1", 90).flushed
    fabric.power_off("web1")
    fabric.power_on("web1")  # the guest checks its whole log when it starts
    status = wait_records(lab, "web1", flushed + 1)
    assert status.start_verdict is not None and status.start_verdict["ok"], status
    assert status.start_verdict["records"] >= flushed


def _create_while_on(lab: Lab, fabric: LabFabric) -> None:
    fabric.power_on("web1")
    fabric.create_snapshot("web1", "s")


def _second(lab: Lab, fabric: LabFabric) -> None:
    fabric.create_snapshot("web1", "one")
    fabric.create_snapshot("web1", "two")


def _declared(lab: Lab, fabric: LabFabric) -> None:
    lab.cli("set", str(lab.path), "machine", "web1", "snapshot+=declared")
    found = fabric.discover().machine("web1")
    assert found is not None
    fabric.revert_to_snapshot("web1", found.snapshots[0].id)


def _unknown(lab: Lab, fabric: LabFabric) -> None:
    fabric.remove_snapshot("web1", "snapshot-nope")


def _reduced_account(lab: Lab, fabric: LabFabric) -> None:
    lab.cli("set", str(lab.path), "account", "full", "privileges-=VirtualMachine.State.CreateSnapshot")
    fabric.create_snapshot("web1", "s")


@pytest.mark.parametrize(
    ("attempt", "code"),
    [
        pytest.param(_create_while_on, "machine-powered-on", id="machine-powered-on"),
        pytest.param(_second, "lab-snapshot-limit", id="lab-snapshot-limit"),
        pytest.param(_declared, "lab-snapshot-not-revertible", id="lab-snapshot-not-revertible"),
        pytest.param(_unknown, "snapshot-not-found", id="snapshot-not-found"),
        pytest.param(
            _reduced_account, "vcenter-insufficient-privileges", id="vcenter-insufficient-privileges"
        ),
    ],
)
def test_snapshot_refusals(lab: Lab, attempt: Callable[[Lab, LabFabric], None], code: str) -> None:
    fabric = lab.fabric()
    with pytest.raises(FabricError) as refused:
        attempt(lab, fabric)
    assert refused.value.code == code
    assert refused.value.remediation
    runtime.stop_all(lab.path)
