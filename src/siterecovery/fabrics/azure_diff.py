"""Which ranges of a managed disk changed between two of its snapshots: the service's diff, if it is exact.

Agentless failback from Azure sends what the recovery VM changed between two incremental
snapshots of each disk. Azure storage answers that in one listing call on the newer snapshot's SAS
(Get Page Ranges with `x-ms-previous-snapshot-url`, the SDK's
`get_page_range_diff_for_managed_disk`): updated and cleared ranges, no data read. Not every
endpoint answers it right (Azurite lists every range of the blob and never a cleared one,
Azure/Azurite#812), and a missed cleared range would leave stale data on the on-premises disk. So
before the first use a self-test runs through ARM itself: a probe managed disk (createOption
Upload, written over a write SAS) gets four pages, a snapshot, page 1 rewritten and page 3
cleared, a second snapshot, and the diff between the two must be exactly those two changes. Only
then is `ManagedDiskDiff` used; otherwise (a wrong answer, or any refusal on the way: an endpoint
or a subscription that does not allow the probe) the content compare
(`dataplane.changed_ranges.ContentCompare`), exact everywhere at the price of reading both
snapshots. The choice is made once per fabric and process, and says why.
"""

from __future__ import annotations

import contextlib
import threading
import uuid
from dataclasses import dataclass

from azure.core.exceptions import AzureError
from azure.storage.blob import BlobClient

from siterecovery.dataplane.changed_ranges import ChangedRange, DiffMethod
from siterecovery.dataplane.page_blob import PAGE, STORAGE_API_VERSION, storage_error
from siterecovery.errors import SiteRecoveryError
from siterecovery.fabrics.azure_arm import Arm
from siterecovery.fabrics.base import FabricError

MiB = 1 << 20
PROBE_SIZE = 1 * MiB  # the smallest managed disk ARM uploads (whole MiB)
PROBE_PREFIX = "siterecovery-diff-probe-"
PROBE_SECONDS = 600
EXPECTED = [ChangedRange(PAGE, PAGE, False), ChangedRange(3 * PAGE, PAGE, True)]


@dataclass(frozen=True)
class DiffChoice:
    method: DiffMethod
    reason: str


class ManagedDiskDiff:
    """The storage service's diff between two snapshots of one managed disk, both read by SAS."""

    method = DiffMethod.SERVICE

    def compare(self, new: BlobClient, old_url: str, size: int) -> list[ChangedRange]:
        """`new`'s changed ranges since the snapshot at `old_url`, in its first `size` bytes (a
        managed disk's VHD footer is not disk content), sorted."""
        try:
            updated, cleared = new.get_page_range_diff_for_managed_disk(old_url, offset=0, length=size)
        except AzureError as exc:
            raise storage_error(f"listing the changed pages of {new.blob_name!r}", exc) from exc
        out = [ChangedRange(r["start"], r["end"] - r["start"] + 1, False) for r in updated]
        out += [ChangedRange(r["start"], r["end"] - r["start"] + 1, True) for r in cleared]
        return sorted(out, key=lambda r: r.offset)


def _blob(url: str) -> BlobClient:
    return BlobClient.from_blob_url(url, api_version=STORAGE_API_VERSION)


def _write(arm: Arm, disk: str, first: bool) -> None:
    blob = _blob(arm.disk_write_url(disk, PROBE_SECONDS))
    try:
        if first:
            blob.upload_page(b"\x01" * (4 * PAGE), offset=0, length=4 * PAGE)
        else:
            blob.upload_page(b"\x02" * PAGE, offset=PAGE, length=PAGE)
            blob.clear_page(offset=3 * PAGE, length=PAGE)
    finally:
        arm.end_disk_read(disk)


def self_test(arm: Arm) -> DiffChoice:
    """Run the probe through ARM; the service's diff only when its answer is exact."""
    name = f"{PROBE_PREFIX}{uuid.uuid4().hex[:12]}"
    made: list[str] = []
    try:
        disk = arm.create_upload_disk(name, PROBE_SIZE)
        _write(arm, name, first=True)
        made.append(arm.snapshot_disk(f"{name}-a", disk.id).name)
        _write(arm, name, first=False)
        made.append(arm.snapshot_disk(f"{name}-b", disk.id).name)
        old_url = arm.snapshot_read_url(made[0], PROBE_SECONDS)
        new = _blob(arm.snapshot_read_url(made[1], PROBE_SECONDS))
        got = ManagedDiskDiff().compare(new, old_url, PROBE_SIZE)
    except (FabricError, SiteRecoveryError, AzureError) as exc:
        return DiffChoice(DiffMethod.CONTENT, f"the managed-disk diff self-test could not run: {exc}")
    finally:
        # A leftover probe is harmless; its name says what it is.
        for snap in made:
            with contextlib.suppress(FabricError, AzureError):
                arm.end_snapshot_read(snap)
                arm.delete_snapshot(snap)
        with contextlib.suppress(FabricError, AzureError):
            arm.delete_disk(name)
    if got == EXPECTED:
        return DiffChoice(DiffMethod.SERVICE, "the managed-disk diff self-test was exact")
    cleared = "no cleared range" if not any(r.cleared for r in got) else "not exactly the two changes"
    return DiffChoice(
        DiffMethod.CONTENT,
        f"the managed-disk diff self-test answered {len(got)} range(s), {cleared}; comparing content instead",
    )


_lock = threading.Lock()
_choices: dict[tuple[str, str, str], DiffChoice] = {}


def choose(arm: Arm, endpoint: str) -> tuple[DiffChoice, bool]:
    """This fabric's choice (made at its first use in this process); True when just made."""
    key = (endpoint, arm.subscription, arm.resource_group)
    with _lock:
        known = _choices.get(key)
    if known is not None:
        return known, False
    choice = self_test(arm)
    with _lock:
        _choices[key] = choice
    return choice, True
