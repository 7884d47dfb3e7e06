"""`Arm` implemented with the Azure SDK: one subscription and resource group, through ARM.

Credentials: a service principal's client secret (`tenant`, `client_id` and the fabric's stored
secret) or, without one, `DefaultAzureCredential` (managed identity, environment, Azure CLI).
Long-running ARM operations are waited for (`.result()`), so each call returns with the resource
in its final state. SDK errors become `FabricError`s with stable codes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from azure.core.credentials import TokenCredential
from azure.core.exceptions import AzureError, HttpResponseError, ResourceNotFoundError
from azure.mgmt.compute import ComputeManagementClient
from azure.mgmt.compute.models import Disk, GrantAccessData, Snapshot, VirtualMachine
from azure.mgmt.network import NetworkManagementClient
from azure.mgmt.network.models import NetworkInterface
from azure.storage.blob import BlobServiceClient

from siterecovery.dataplane.page_blob import STORAGE_API_VERSION
from siterecovery.errors import Problem, SiteRecoveryError, Status
from siterecovery.fabrics.azure import DEFAULT_REPLICA_CONTAINER, DEFAULT_VM_SIZE, READ_SECONDS, AzureFabric
from siterecovery.fabrics.azure_arm import (
    ArmConnection,
    ArmDisk,
    ArmNic,
    ArmSnapshot,
    ArmVm,
    Usage,
    VmCreate,
    VmSize,
)
from siterecovery.fabrics.base import FabricError, IpMode, OsType, PowerState

T = TypeVar("T")
Json = Mapping[str, Any]


PUBLIC_ARM = "https://management.azure.com"


def credential(tenant: str, client_id: str, secret: str, authority_host: str = "") -> TokenCredential:
    """The service principal's credential, or the server's own identity without a secret.

    `authority_host` is the identity provider of a sovereign cloud or an Azure Stack Hub
    (`https://login.microsoftonline.us`, an AD FS / Entra host): tokens are asked there, and MSAL's
    instance discovery, which asks the public cloud which authorities exist, is turned off for it.
    """
    from azure.identity import ClientSecretCredential, DefaultAzureCredential

    custom: dict[str, Any] = (
        {"authority": authority_host, "disable_instance_discovery": True} if authority_host else {}
    )

    if secret:
        if not (tenant and client_id):
            raise SiteRecoveryError(
                Problem(
                    "azure-credentials-incomplete",
                    "The Azure fabric has a client secret but no tenant or client id to use it with.",
                    "Give --tenant and --client-id with --client-secret-file (or neither, to use the "
                    "server's managed identity).",
                ),
                Status.UNPROCESSABLE,
            )
        return ClientSecretCredential(tenant, client_id, secret, **custom)
    return DefaultAzureCredential(**custom)


# What ARM answers a per-location listing when the location is unknown or not enabled.
REGION_REFUSALS = frozenset(
    {"LocationNotAvailableForResourceType", "InvalidLocation", "NoRegisteredProviderFound",
     "LocationNotFound"}
)  # fmt: skip


def _os(value: object) -> OsType | None:
    text = str(value or "").lower()
    return OsType(text) if text in ("linux", "windows") else None


def _name(resource_id: str) -> str:
    return resource_id.rstrip("/").rsplit("/", 1)[-1]


def _props(model: Any) -> tuple[Json, Json]:
    """A model as ARM's REST JSON (wire names): the resource and its `properties`."""
    body: Json = model.as_dict()
    return body, body.get("properties") or {}


class SdkArm:
    def __init__(
        self,
        subscription: str,
        resource_group: str,
        location: str,
        storage_account: str,
        cred: TokenCredential,
        arm_endpoint: str = PUBLIC_ARM,
    ) -> None:
        self.subscription = subscription
        self.resource_group = resource_group
        self._location = location
        self.storage_account_id = (
            f"/subscriptions/{subscription}/resourceGroups/{resource_group}"
            f"/providers/Microsoft.Storage/storageAccounts/{storage_account}"
        )
        # Another cloud's ARM (a sovereign cloud, an Azure Stack Hub) is also its token audience.
        endpoint = arm_endpoint.rstrip("/") or PUBLIC_ARM
        self.endpoint = endpoint
        scopes = [f"{endpoint}/.default"]
        self._compute = ComputeManagementClient(
            cred, subscription, base_url=endpoint, credential_scopes=scopes
        )
        self._network = NetworkManagementClient(
            cred, subscription, base_url=endpoint, credential_scopes=scopes
        )

    def _call(self, what: str, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except ResourceNotFoundError as exc:
            raise FabricError(
                "azure-resource-not-found",
                f"Azure has no {what} in resource group {self.resource_group}: {exc.message}",
                "Check the name, or discover the fabric again.",
            ) from exc
        except AzureError as exc:
            raise FabricError(
                "azure-arm-failed",
                f"Azure refused to {what}: {exc}",
                "Check the service principal's role on the resource group and the subscription's quotas.",
            ) from exc

    def location(self) -> str:
        return self._location

    # ---- discovery --------------------------------------------------------------------------

    def _vm(self, vm: VirtualMachine) -> ArmVm:
        body, props = _props(vm)
        name = str(body.get("name", ""))
        view = self._call(
            "read a VM's instance view",
            lambda: self._compute.virtual_machines.instance_view(self.resource_group, name),
        )
        codes = [str(s.get("code", "")) for s in view.as_dict().get("statuses", [])]
        storage = props.get("storageProfile") or {}
        os_disk = storage.get("osDisk") or {}
        data = sorted(storage.get("dataDisks") or [], key=lambda d: int(d.get("lun", 0)))
        nics = (props.get("networkProfile") or {}).get("networkInterfaces") or []
        return ArmVm(
            id=str(body.get("id", "")),
            name=name,
            vm_id=str(props.get("vmId", "")),
            size=str((props.get("hardwareProfile") or {}).get("vmSize", "")),
            os_type=_os(os_disk.get("osType")) or OsType.LINUX,
            power_state=PowerState.ON if "PowerState/running" in codes else PowerState.OFF,
            os_disk_id=str((os_disk.get("managedDisk") or {}).get("id", "")),
            data_disk_ids=tuple(str((d.get("managedDisk") or {}).get("id", "")) for d in data),
            nic_ids=tuple(str(n.get("id", "")) for n in nics),
            tags=dict(body.get("tags") or {}),
        )

    def list_vms(self) -> list[ArmVm]:
        vms = self._call("list VMs", lambda: list(self._compute.virtual_machines.list(self.resource_group)))
        return [self._vm(vm) for vm in vms]

    @staticmethod
    def _disk(d: Disk) -> ArmDisk:
        body, props = _props(d)
        return ArmDisk(
            id=str(body.get("id", "")),
            name=str(body.get("name", "")),
            unique_id=str(props.get("uniqueId") or body.get("id", "")),
            size_bytes=int(props.get("diskSizeBytes") or int(props.get("diskSizeGB") or 0) << 30),
            os_type=_os(props.get("osType")),
            source_uri=str((props.get("creationData") or {}).get("sourceUri", "")),
            managed_by=str(body.get("managedBy") or ""),
            state=str(props.get("diskState") or ""),
        )

    def list_disks(self) -> list[ArmDisk]:
        disks = self._call(
            "list managed disks",
            lambda: list(self._compute.disks.list_by_resource_group(self.resource_group)),
        )
        return [self._disk(d) for d in disks]

    @staticmethod
    def _nic(n: NetworkInterface) -> ArmNic:
        body, props = _props(n)
        ip = ((props.get("ipConfigurations") or [{}])[0]).get("properties") or {}
        return ArmNic(
            id=str(body.get("id", "")),
            name=str(body.get("name", "")),
            mac=str(props.get("macAddress") or "").replace("-", ":").lower(),
            private_ip=str(ip.get("privateIPAddress") or ""),
            ip_mode=IpMode.STATIC if ip.get("privateIPAllocationMethod") == "Static" else IpMode.DHCP,
            subnet_id=str((ip.get("subnet") or {}).get("id", "")),
        )

    def list_nics(self) -> list[ArmNic]:
        nics = self._call(
            "list NICs", lambda: list(self._network.network_interfaces.list(self.resource_group))
        )
        return [self._nic(n) for n in nics]

    def _regional(self, what: str, fn: Callable[[], list[T]]) -> list[T]:
        """A per-location listing; nothing where ARM refuses the location itself (AZ-REGION)."""
        try:
            return self._call(what, fn)
        except FabricError as exc:
            cause = exc.__cause__
            error = cause.error if isinstance(cause, HttpResponseError) else None
            if error is not None and error.code in REGION_REFUSALS:
                return []
            raise

    def vm_sizes(self) -> list[VmSize]:
        sizes = self._regional(
            "list VM sizes", lambda: list(self._compute.virtual_machine_sizes.list(self._location))
        )
        return [
            VmSize(
                str(s.name),
                int(s.number_of_cores or 0),
                int(s.memory_in_mb or 0),
                int(s.max_data_disk_count or 0),
            )
            for s in sizes
        ]

    def usages(self) -> list[Usage]:
        usages = self._regional("list quotas", lambda: list(self._compute.usage.list(self._location)))
        return [
            Usage(str(u.name.value if u.name else ""), int(u.current_value or 0), int(u.limit or 0))
            for u in usages
        ]

    def gateway_connections(self) -> list[ArmConnection]:
        conns = self._call(
            "list gateway connections",
            lambda: list(self._network.virtual_network_gateway_connections.list(self.resource_group)),
        )
        out: list[ArmConnection] = []
        for c in conns:
            body, props = _props(c)
            gateway = _name(str((props.get("virtualNetworkGateway1") or {}).get("id", "")))
            gw = self._call(
                f"read gateway {gateway}",
                lambda g=gateway: self._network.virtual_network_gateways.get(self.resource_group, g),  # type: ignore[misc]
            )
            ip = ((_props(gw)[1].get("ipConfigurations") or [{}])[0]).get("properties") or {}
            subnet = str((ip.get("subnet") or {}).get("id", ""))
            status = str(props.get("connectionStatus") or "Unknown")
            out.append(ArmConnection(str(body.get("name", "")), subnet.split("/subnets/")[0], status))
        return out

    # ---- changes ----------------------------------------------------------------------------

    def _put_disk(self, name: str, creation: Json, os_type: OsType | None) -> ArmDisk:
        props: dict[str, Any] = {"creationData": dict(creation)}
        if os_type is not None:
            props["osType"] = os_type.value.title()
        disk = Disk({"location": self._location, "properties": props})
        poller = self._call(
            f"create managed disk {name}",
            lambda: self._compute.disks.begin_create_or_update(self.resource_group, name, disk),
        )
        return self._disk(self._call(f"create managed disk {name}", poller.result))

    def import_disk(self, name: str, source_uri: str, size_bytes: int, os_type: OsType | None) -> ArmDisk:
        creation = {
            "createOption": "Import",
            "sourceUri": source_uri,
            "storageAccountId": self.storage_account_id,
        }
        return self._put_disk(name, creation, os_type)

    def disk_from_snapshot(self, name: str, snapshot_id: str, os_type: OsType | None) -> ArmDisk:
        return self._put_disk(name, {"createOption": "Copy", "sourceResourceId": snapshot_id}, os_type)

    def _wait(self, what: str, start: Callable[[], Any]) -> None:
        poller = self._call(what, start)
        self._call(what, poller.result)

    def delete_disk(self, name: str) -> None:
        self._wait(f"delete disk {name}", lambda: self._compute.disks.begin_delete(self.resource_group, name))

    def disk_read_url(self, name: str, seconds: int) -> str:
        grant = GrantAccessData({"access": "Read", "durationInSeconds": seconds})
        poller = self._call(
            f"grant read access to disk {name}",
            lambda: self._compute.disks.begin_grant_access(self.resource_group, name, grant),
        )
        access = self._call(f"grant read access to disk {name}", poller.result)
        return str(access.as_dict().get("accessSAS", ""))

    def create_upload_disk(self, name: str, size_bytes: int) -> ArmDisk:
        # ARM counts the VHD footer an upload ends with.
        return self._put_disk(name, {"createOption": "Upload", "uploadSizeBytes": size_bytes + 512}, None)

    def disk_write_url(self, name: str, seconds: int) -> str:
        grant = GrantAccessData({"access": "Write", "durationInSeconds": seconds})
        poller = self._call(
            f"grant write access to disk {name}",
            lambda: self._compute.disks.begin_grant_access(self.resource_group, name, grant),
        )
        access = self._call(f"grant write access to disk {name}", poller.result)
        return str(access.as_dict().get("accessSAS", ""))

    def end_disk_read(self, name: str) -> None:
        self._wait(
            f"revoke read access to disk {name}",
            lambda: self._compute.disks.begin_revoke_access(self.resource_group, name),
        )

    def snapshot_read_url(self, name: str, seconds: int) -> str:
        grant = GrantAccessData({"access": "Read", "durationInSeconds": seconds})
        poller = self._call(
            f"grant read access to snapshot {name}",
            lambda: self._compute.snapshots.begin_grant_access(self.resource_group, name, grant),
        )
        access = self._call(f"grant read access to snapshot {name}", poller.result)
        return str(access.as_dict().get("accessSAS", ""))

    def end_snapshot_read(self, name: str) -> None:
        self._wait(
            f"revoke read access to snapshot {name}",
            lambda: self._compute.snapshots.begin_revoke_access(self.resource_group, name),
        )

    def create_nic(self, name: str, subnet_id: str, private_ip: str) -> ArmNic:
        ip: dict[str, Any] = {
            "subnet": {"id": subnet_id},
            "privateIPAllocationMethod": "Static" if private_ip else "Dynamic",
        }
        if private_ip:
            ip["privateIPAddress"] = private_ip
        nic = NetworkInterface(
            {
                "location": self._location,
                "properties": {"ipConfigurations": [{"name": "ipconfig1", "properties": ip}]},
            }
        )
        poller = self._call(
            f"create NIC {name}",
            lambda: self._network.network_interfaces.begin_create_or_update(self.resource_group, name, nic),
        )
        return self._nic(self._call(f"create NIC {name}", poller.result))

    def delete_nic(self, name: str) -> None:
        self._wait(
            f"delete NIC {name}",
            lambda: self._network.network_interfaces.begin_delete(self.resource_group, name),
        )

    @staticmethod
    def _storage(os_type: OsType, os_disk_id: str, data: tuple[str, ...]) -> Json:
        return {
            "osDisk": {
                "createOption": "Attach",
                "osType": os_type.value.title(),
                "managedDisk": {"id": os_disk_id},
            },
            "dataDisks": [
                {"lun": lun, "createOption": "Attach", "managedDisk": {"id": disk_id}}
                for lun, disk_id in enumerate(data)
            ],
        }

    def _put_vm(self, name: str, vm: VirtualMachine) -> ArmVm:
        poller = self._call(
            f"create or update VM {name}",
            lambda: self._compute.virtual_machines.begin_create_or_update(self.resource_group, name, vm),
        )
        return self._vm(self._call(f"create or update VM {name}", poller.result))

    def create_vm(self, spec: VmCreate) -> ArmVm:
        nics = [{"id": nic, "properties": {"primary": i == 0}} for i, nic in enumerate(spec.nic_ids)]
        vm = VirtualMachine(
            {
                "location": self._location,
                "tags": dict(spec.tags),
                "properties": {
                    "hardwareProfile": {"vmSize": spec.size},
                    "storageProfile": self._storage(spec.os_type, spec.os_disk_id, spec.data_disk_ids),
                    "networkProfile": {"networkInterfaces": nics},
                },
            }
        )
        return self._put_vm(spec.name, vm)

    def set_disks(self, vm: str, os_disk_id: str, data_disk_ids: tuple[str, ...]) -> ArmVm:
        current = self._call(
            f"read VM {vm}", lambda: self._compute.virtual_machines.get(self.resource_group, vm)
        )
        body, props = _props(current)
        os_type = _os(((props.get("storageProfile") or {}).get("osDisk") or {}).get("osType")) or OsType.LINUX
        updated = VirtualMachine(
            {
                "location": body.get("location", self._location),
                "tags": dict(body.get("tags") or {}),
                "properties": {
                    **props,
                    "storageProfile": self._storage(os_type, os_disk_id, data_disk_ids),
                },
            }
        )
        return self._put_vm(vm, updated)

    def delete_vm(self, name: str) -> None:
        self._wait(
            f"delete VM {name}",
            lambda: self._compute.virtual_machines.begin_delete(self.resource_group, name),
        )

    def start_vm(self, name: str) -> None:
        self._wait(
            f"start VM {name}", lambda: self._compute.virtual_machines.begin_start(self.resource_group, name)
        )

    def deallocate_vm(self, name: str) -> None:
        self._wait(
            f"deallocate VM {name}",
            lambda: self._compute.virtual_machines.begin_deallocate(self.resource_group, name),
        )

    @staticmethod
    def _snapshot(s: Snapshot) -> ArmSnapshot:
        body, props = _props(s)
        source = str((props.get("creationData") or {}).get("sourceResourceId", ""))
        state = str(props.get("diskState") or "")
        return ArmSnapshot(str(body.get("id", "")), str(body.get("name", "")), source, state)

    def snapshot_disk(self, name: str, disk_id: str) -> ArmSnapshot:
        snap = Snapshot(
            {
                "location": self._location,
                "properties": {
                    "creationData": {"createOption": "Copy", "sourceResourceId": disk_id},
                    "incremental": True,
                },
            }
        )
        poller = self._call(
            f"snapshot disk {_name(disk_id)}",
            lambda: self._compute.snapshots.begin_create_or_update(self.resource_group, name, snap),
        )
        return self._snapshot(self._call(f"snapshot disk {_name(disk_id)}", poller.result))

    def list_snapshots(self) -> list[ArmSnapshot]:
        snaps = self._call(
            "list snapshots",
            lambda: list(self._compute.snapshots.list_by_resource_group(self.resource_group)),
        )
        return [self._snapshot(s) for s in snaps]

    def delete_snapshot(self, name: str) -> None:
        self._wait(
            f"delete snapshot {name}", lambda: self._compute.snapshots.begin_delete(self.resource_group, name)
        )


def open_azure(name: str, site: str, connection: Mapping[str, Any], secret: str) -> AzureFabric:
    """The fabric a stored `azure` connection describes (`fabrics add azure`); opens no connection yet."""
    cred = credential(
        str(connection.get("tenant", "")),
        str(connection.get("client_id", "")),
        secret,
        str(connection.get("authority_host") or ""),
    )
    account = str(connection["storage_account"])
    arm = SdkArm(
        str(connection["subscription"]),
        str(connection["resource_group"]),
        str(connection["location"]),
        account,
        cred,
        str(connection.get("arm_endpoint") or PUBLIC_ARM),
    )
    blobs = str(connection.get("blob_endpoint") or f"https://{account}.blob.core.windows.net")
    # No credential: the server only names replica blobs (ARM imports them; failback reads the
    # recovery VM's disks over the SAS ARM grants), it never reads or writes the account itself.
    storage = BlobServiceClient(blobs.rstrip("/"), api_version=STORAGE_API_VERSION)
    return AzureFabric(
        name,
        site,
        arm,
        storage.get_container_client(str(connection.get("replica_container") or DEFAULT_REPLICA_CONTAINER)),
        subnet_id=str(connection["subnet_id"]),
        vm_size=str(connection.get("vm_size") or DEFAULT_VM_SIZE),
        read_seconds=int(connection.get("sas_seconds") or READ_SECONDS),
    )
