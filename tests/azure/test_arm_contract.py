"""The Azure fabric's cases against a real subscription through `SdkArm`: the contract FakeArm follows.

Runs only when a subscription's credentials and resources are named in the environment (below); it
creates a VM with two small managed disks and a NIC in the resource group and deletes them again.
Without them every test here is skipped, saying so: this is the one skip in the suite that CI
allows, because no subscription is available there (it is not a missing tool).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import pytest

from siterecovery.dataplane.changed_ranges import DiffMethod
from siterecovery.dataplane.page_blob import CONNECTION_ENV, open_container
from siterecovery.fabrics.azure import AzureFabric
from siterecovery.fabrics.azure_sdk import SdkArm, credential
from tests.azure import fabric_cases as cases

REQUIRED = (
    "AZURE_SUBSCRIPTION_ID",
    "AZURE_RESOURCE_GROUP",
    "AZURE_LOCATION",
    "AZURE_STORAGE_ACCOUNT",
    "AZURE_SUBNET_ID",
    CONNECTION_ENV,  # the storage account's connection string, for the replica page blobs
)
MISSING = [name for name in REQUIRED if not os.environ.get(name)]

pytestmark = pytest.mark.skipif(
    bool(MISSING),
    reason="Azure contract tests skipped: no Azure subscription credentials set (missing "
    + ", ".join(MISSING)
    + "); they run only against a real subscription",
)


@pytest.fixture
def site() -> Iterator[cases.Site]:
    env = os.environ
    arm = SdkArm(
        env["AZURE_SUBSCRIPTION_ID"],
        env["AZURE_RESOURCE_GROUP"],
        env["AZURE_LOCATION"],
        env["AZURE_STORAGE_ACCOUNT"],
        credential(
            env.get("AZURE_TENANT_ID", ""), env.get("AZURE_CLIENT_ID", ""), env.get("AZURE_CLIENT_SECRET", "")
        ),
    )
    replicas = open_container(env[CONNECTION_ENV], "siterecovery-contract")
    fabric = AzureFabric(
        "azure", "cloud", arm, replicas, subnet_id=env["AZURE_SUBNET_ID"], vm_size="Standard_B1s"
    )
    yield cases.Site(fabric, arm, replicas)
    for blob in replicas.list_blobs(name_starts_with="case-"):
        with contextlib.suppress(Exception):
            replicas.delete_blob(blob.name)


def test_failover_snapshot_revert_and_delete(site: cases.Site) -> None:
    name, digests = cases.failover(site)
    try:
        cases.case_failover_creates_the_vm_on_disks_imported_from_the_replicas(site, name, digests)
        cases.case_snapshot_revert_and_remove(site, name, digests)
    finally:
        cases.case_delete_machine_removes_vm_nics_and_disks(site, name)


def test_the_managed_disk_diff_self_test(site: cases.Site) -> None:
    """Real ARM lets the probe run (an Upload disk written again after a snapshot: if not, the fake
    is wrong and failback compares content) and its diff, reporting cleared ranges, passes."""
    choice = cases.case_the_diff_self_test_reaches_a_verdict_and_leaves_no_probe(site)
    assert choice.method is DiffMethod.SERVICE, choice
