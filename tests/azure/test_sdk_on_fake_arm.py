"""`SdkArm` — the real azure-mgmt SDK and azure-identity — through a configurable ARM endpoint and
authority host (`fabrics add azure --arm-endpoint/--authority-host`), against the fake ARM process:
the fabric's cases (fabric_cases.py) over HTTPS, a token from the fake's identity provider, and
ARM's long-running operations polled as the SDK polls them."""

from __future__ import annotations

import pytest

from siterecovery.fabrics.azure import AzureFabric
from siterecovery.fabrics.azure_sdk import SdkArm, credential
from siterecovery.fabrics.base import FabricError
from tests.azure import fabric_cases as cases
from tests.azure.conftest import Azurite, FakeArmEndpoint
from tests.azure.test_fabric import SUBNET


def sdk_arm(endpoint: FakeArmEndpoint, secret: str) -> SdkArm:
    cred = credential(endpoint.tenant, endpoint.client_id, secret, endpoint.url)
    return SdkArm("0000", "rg-recovery", "westeurope", "devstoreaccount1", cred, endpoint.url)


def test_sdk_arm_runs_the_fabric_cases_through_a_configured_endpoint(
    azurite: Azurite, fake_arm_endpoint: FakeArmEndpoint
) -> None:
    arm = sdk_arm(fake_arm_endpoint, fake_arm_endpoint.secret)
    replicas = azurite.container("replicas")
    site = cases.Site(AzureFabric("azure", "cloud", arm, replicas, subnet_id=SUBNET), arm, replicas)
    name, digests = cases.failover(site)
    cases.case_failover_creates_the_vm_on_disks_imported_from_the_replicas(site, name, digests)
    cases.case_snapshot_revert_and_remove(site, name, digests)
    cases.case_delete_machine_removes_vm_nics_and_disks(site, name)
    assert [s.name for s in arm.vm_sizes()][:1] == ["Standard_B1s"]
    assert [(u.name, u.limit) for u in arm.usages()] == [("cores", 10)]


def test_a_wrong_secret_gets_no_token_and_a_missing_vm_is_not_found(
    fake_arm_endpoint: FakeArmEndpoint,
) -> None:
    with pytest.raises(Exception) as refused:
        sdk_arm(fake_arm_endpoint, "wrong").list_vms()
    assert "invalid_client" in str(refused.value) or "wrong secret" in str(refused.value)
    with pytest.raises(FabricError) as missing:
        sdk_arm(fake_arm_endpoint, fake_arm_endpoint.secret).start_vm("nothere")
    assert missing.value.code == "azure-resource-not-found"
