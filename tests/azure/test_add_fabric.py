"""`fabrics add azure`: the API names what an Azure connection lacks; a stored connection opens as
the Azure fabric with its settings (opening contacts nothing: discovery is the first ARM call)."""

from __future__ import annotations

from pathlib import Path

import pytest

from siterecovery.errors import SiteRecoveryError
from siterecovery.fabrics.azure import DEFAULT_REPLICA_CONTAINER, AzureFabric
from siterecovery.fabrics.azure_sdk import SdkArm, open_azure
from tests.conftest import free_port, run_cli
from tests.control.conftest import ConfigServer

CONNECTION = {
    "subscription": "11111111-2222-3333-4444-555555555555",
    "resource_group": "rg-recovery",
    "location": "westeurope",
    "storage_account": "srreplicas",
    "subnet_id": "/subscriptions/1/resourceGroups/n/providers/Microsoft.Network/virtualNetworks/v/subnets/a",
}


def test_the_api_names_each_missing_azure_setting(tmp_path: Path) -> None:
    cs = ConfigServer(state_dir=tmp_path / "state", port=free_port(), log=tmp_path / "server.log")
    cs.start()
    try:
        for key in CONNECTION:
            partial = {k: v for k, v in CONNECTION.items() if k != key}
            resp = cs.api("POST", "/api/fabrics", json={"name": "az", "kind": "azure", "connection": partial})
            assert resp.status_code in (400, 422), resp.text
            assert f"connection.{key}" in resp.text
        body = {"name": "az", "kind": "azure", "connection": CONNECTION, "secret": "s3cret"}
        resp = cs.api("POST", "/api/fabrics", json=body)  # a secret without tenant and client id
        assert resp.status_code == 422 and resp.json()["code"] == "azure-credentials-incomplete", resp.text
        for key, value in (
            ("arm_endpoint", "http://management.example"),  # the SDK's token policy needs https
            ("authority_host", "https://login.example/path"),  # an origin, nothing after it
            ("blob_endpoint", "http://10.0.0.5:10000/acct"),  # plain http only on loopback
        ):
            bad = {"name": "az", "kind": "azure", "connection": {**CONNECTION, key: value}}
            resp = cs.api("POST", "/api/fabrics", json=bad)
            assert resp.status_code in (400, 422) and f"connection.{key}" in resp.text, resp.text
        assert cs.api("GET", "/api/fabrics").json() == []
        out = run_cli("fabrics", "add", "azure", "--subscription", "x", env=cs.env, check=False)
        assert out.returncode != 0 and "--resource-group" in out.stderr
    finally:
        cs.stop()


def test_a_stored_connection_opens_as_the_azure_fabric() -> None:
    service_principal = {"vm_size": "Standard_B2s", "client_id": "app", "tenant": "contoso"}
    fabric = open_azure("az", "cloud", {**CONNECTION, **service_principal}, "s3cret")
    assert isinstance(fabric, AzureFabric) and isinstance(fabric.arm, SdkArm)
    assert (fabric.name, fabric.site, fabric.vm_size, fabric.subnet_id) == (
        "az",
        "cloud",
        "Standard_B2s",
        CONNECTION["subnet_id"],
    )
    assert fabric.arm.storage_account_id.endswith(
        "/resourceGroups/rg-recovery/providers/Microsoft.Storage/storageAccounts/srreplicas"
    )
    assert fabric.replicas.url == f"https://srreplicas.blob.core.windows.net/{DEFAULT_REPLICA_CONTAINER}"
    assert fabric.replicas.api_version == "2025-11-05"
    elsewhere = {
        "arm_endpoint": "https://management.usgovcloudapi.net",
        "authority_host": "https://login.microsoftonline.us",
        "blob_endpoint": "https://srreplicas.blob.core.usgovcloudapi.net",
    }
    sovereign = open_azure("az", "cloud", {**CONNECTION, **elsewhere}, "")
    assert sovereign.replicas.url == f"{elsewhere['blob_endpoint']}/{DEFAULT_REPLICA_CONTAINER}"
    assert isinstance(sovereign.arm, SdkArm) and sovereign.arm.endpoint == elsewhere["arm_endpoint"]
    with pytest.raises(SiteRecoveryError) as incomplete:
        open_azure("az", "cloud", {**CONNECTION, "client_id": "app"}, "s3cret")  # a secret, but no tenant
    assert incomplete.value.first.code == "azure-credentials-incomplete"
