"""The managed-disk diff's self-test through ARM: a probe disk written, snapshotted, rewritten and
cleared, snapshotted again. On the fake ARM (its disks and snapshots are Azurite page blobs) the
service's answer misses the cleared page (Azure/Azurite#812), so the content compare is chosen,
saying why, once per fabric; the probe leaves nothing behind."""

from __future__ import annotations

import pytest

from siterecovery.dataplane.changed_ranges import DiffMethod
from siterecovery.fabrics import azure_diff
from siterecovery.fabrics.azure import AzureFabric
from siterecovery.fabrics.azure_diff import PROBE_PREFIX, self_test
from tests.azure.conftest import Azurite, FakeArmEndpoint
from tests.azure.fake_arm import FakeArm
from tests.azure.test_jobs import sdk_arm


def test_the_self_test_through_the_fake_arm_process_picks_the_content_compare(
    fake_arm_endpoint: FakeArmEndpoint, azurite: Azurite
) -> None:
    arm = sdk_arm(fake_arm_endpoint)  # the real SDK: Upload disk, write SAS, incremental snapshots
    choice = self_test(arm)
    assert choice.method is DiffMethod.CONTENT, choice
    assert "no cleared range" in choice.reason, choice  # it ran to the end: Azurite's answer was wrong
    assert not [d for d in arm.list_disks() if d.name.startswith(PROBE_PREFIX)]
    assert not [s for s in arm.list_snapshots() if s.name.startswith(PROBE_PREFIX)]
    blobs = azurite.container_client(fake_arm_endpoint.disks)
    assert not [b.name for b in blobs.list_blobs() if PROBE_PREFIX in b.name]


def test_the_choice_is_made_once_per_fabric(azurite: Azurite, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(azure_diff, "_choices", {})
    arm = FakeArm(azurite.container("disks"))
    fabric = AzureFabric("azure", "cloud", arm, azurite.container("replicas"), subnet_id="subnet")
    first, made = fabric.diff_choice()
    assert made and first.method is DiffMethod.CONTENT
    again, made = fabric.diff_choice()
    assert not made and again == first
    assert arm.disks == {} and arm.snapshots == {}  # the probe is gone


def test_a_probe_arm_refuses_fails_closed(azurite: Azurite) -> None:
    """Where ARM refuses any step (here: a write access it cannot grant), the content compare."""

    class NoUploads(FakeArm):
        def disk_write_url(self, name: str, seconds: int) -> str:
            raise azure_diff.FabricError("azure-arm-failed", "(fake ARM) no write access", "")

    arm = NoUploads(azurite.container("disks"))
    choice = self_test(arm)
    assert choice.method is DiffMethod.CONTENT and "could not run" in choice.reason
    assert arm.disks == {}
