"""A fake Azure Resource Manager served over HTTPS, for tests that drive the real Azure SDK.

The configuration server talks to ARM only through `SdkArm` (azure-mgmt-compute/-network and
azure-identity); pointing a fabric's `arm_endpoint` and `authority_host` here lets the server's DR
jobs run against it unchanged. This process answers the REST subset `SdkArm` calls, keeping the
resources in a `FakeArm` (tests/azure/fake_arm.py), so managed disks and snapshots are real page
blobs in Azurite. What the SDK expects of ARM, and the fake does:

- TLS (the SDK's bearer-token policy refuses plain http), with a certificate from the test's CA,
  which the server trusts through `REQUESTS_CA_BUNDLE`.
- An identity provider: the OpenID configuration and a client-credentials token endpoint that
  issues a token only for the one client secret it was started with; every ARM call must carry it.
- Long-running operations as ARM runs them: a VM's or NIC's PUT answers 201 and is polled on the
  resource (`provisioningState`); a disk's or snapshot's PUT, a POST or a DELETE answers 202
  with `Azure-AsyncOperation` and `Location` (the operation's status, then its result);
  `Retry-After: 0`, so the SDK polls without waiting.
- ARM's error shape (`{"error": {"code", "message"}}`), 404 for a missing resource.

Run: `python -m tests.azure.fake_arm_server --port-file F --cert C --key K --secret S
--storage CONNECTION --container NAME`; it writes its port to F once it listens.
"""

from __future__ import annotations

import argparse
import json
import re
import secrets
import ssl
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from siterecovery.dataplane.page_blob import open_container
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
from siterecovery.fabrics.base import FabricError, OsType, PowerState
from tests.azure.fake_arm import REGIONS, FakeArm

Json = dict[str, Any]
GROUP = r"/subscriptions/(?P<sub>[^/]+)/resourceGroups/(?P<rg>[^/]+)/providers"
REGION = r"/subscriptions/(?P<sub>[^/]+)/providers/Microsoft\.Compute/locations/(?P<loc>[^/]+)"
ROUTES: list[tuple[str, str, str]] = [
    # (method, path pattern, handler name)
    ("GET", GROUP + r"/Microsoft\.Compute/virtualMachines", "list_vms"),
    ("GET", GROUP + r"/Microsoft\.Compute/virtualMachines/(?P<name>[^/]+)", "get_vm"),
    ("GET", GROUP + r"/Microsoft\.Compute/virtualMachines/(?P<name>[^/]+)/instanceView", "vm_view"),
    ("PUT", GROUP + r"/Microsoft\.Compute/virtualMachines/(?P<name>[^/]+)", "put_vm"),
    ("DELETE", GROUP + r"/Microsoft\.Compute/virtualMachines/(?P<name>[^/]+)", "delete_vm"),
    ("POST", GROUP + r"/Microsoft\.Compute/virtualMachines/(?P<name>[^/]+)/start", "start_vm"),
    ("POST", GROUP + r"/Microsoft\.Compute/virtualMachines/(?P<name>[^/]+)/deallocate", "deallocate_vm"),
    ("GET", GROUP + r"/Microsoft\.Compute/disks", "list_disks"),
    ("GET", GROUP + r"/Microsoft\.Compute/disks/(?P<name>[^/]+)", "get_disk"),
    ("PUT", GROUP + r"/Microsoft\.Compute/disks/(?P<name>[^/]+)", "put_disk"),
    ("DELETE", GROUP + r"/Microsoft\.Compute/disks/(?P<name>[^/]+)", "delete_disk"),
    ("POST", GROUP + r"/Microsoft\.Compute/disks/(?P<name>[^/]+)/beginGetAccess", "grant_disk"),
    ("POST", GROUP + r"/Microsoft\.Compute/disks/(?P<name>[^/]+)/endGetAccess", "revoke_disk"),
    ("GET", GROUP + r"/Microsoft\.Compute/snapshots", "list_snapshots"),
    ("GET", GROUP + r"/Microsoft\.Compute/snapshots/(?P<name>[^/]+)", "get_snapshot"),
    ("PUT", GROUP + r"/Microsoft\.Compute/snapshots/(?P<name>[^/]+)", "put_snapshot"),
    ("DELETE", GROUP + r"/Microsoft\.Compute/snapshots/(?P<name>[^/]+)", "delete_snapshot"),
    ("POST", GROUP + r"/Microsoft\.Compute/snapshots/(?P<name>[^/]+)/beginGetAccess", "grant_snapshot"),
    ("POST", GROUP + r"/Microsoft\.Compute/snapshots/(?P<name>[^/]+)/endGetAccess", "revoke_snapshot"),
    ("GET", GROUP + r"/Microsoft\.Network/networkInterfaces", "list_nics"),
    ("GET", GROUP + r"/Microsoft\.Network/networkInterfaces/(?P<name>[^/]+)", "get_nic"),
    ("PUT", GROUP + r"/Microsoft\.Network/networkInterfaces/(?P<name>[^/]+)", "put_nic"),
    ("DELETE", GROUP + r"/Microsoft\.Network/networkInterfaces/(?P<name>[^/]+)", "delete_nic"),
    ("GET", REGION + "/vmSizes", "sizes"),
    ("GET", GROUP + r"/Microsoft\.Network/connections", "list_connections"),
    ("GET", GROUP + r"/Microsoft\.Network/virtualNetworkGateways/(?P<name>[^/]+)", "get_gateway"),
    ("GET", REGION + "/usages", "usages"),
]  # fmt: skip


class ArmFault(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def _missing(kind: str, name: str) -> ArmFault:
    return ArmFault(404, "ResourceNotFound", f"The {kind} '{name}' was not found.")


def _size(s: VmSize) -> Json:
    return {
        "name": s.name,
        "numberOfCores": s.cores,
        "memoryInMB": s.memory_mb,
        "maxDataDiskCount": s.max_data_disks,
    }


def _usage(u: Usage) -> Json:
    name = {"value": u.name, "localizedValue": u.name}
    return {"unit": "Count", "name": name, "currentValue": u.current, "limit": u.limit}


class FakeArmService:
    """ARM's REST JSON over a `FakeArm`; one lock, so requests apply one at a time."""

    def __init__(self, arm: FakeArm, secret: str) -> None:
        self.arm = arm
        self.secret = secret
        self.tokens: set[str] = set()
        self.lock = threading.Lock()
        self.operations: dict[str, Json | None] = {}  # id -> the finished operation's result

    # ---- JSON views -----------------------------------------------------------------------------

    def _vm(self, vm: ArmVm) -> Json:
        return {
            "id": vm.id,
            "name": vm.name,
            "type": "Microsoft.Compute/virtualMachines",
            "location": self.arm.location(),
            "tags": dict(vm.tags),
            "properties": {
                "vmId": vm.vm_id,
                "provisioningState": "Succeeded",
                "hardwareProfile": {"vmSize": vm.size},
                "storageProfile": {
                    "osDisk": {
                        "osType": vm.os_type.value.title(),
                        "createOption": "Attach",
                        "managedDisk": {"id": vm.os_disk_id},
                    },
                    "dataDisks": [
                        {"lun": lun, "createOption": "Attach", "managedDisk": {"id": d}}
                        for lun, d in enumerate(vm.data_disk_ids)
                    ],
                },
                "networkProfile": {"networkInterfaces": [{"id": n} for n in vm.nic_ids]},
            },
        }

    def _disk(self, d: ArmDisk) -> Json:
        props: Json = {
            "uniqueId": d.unique_id,
            "diskState": d.state,
            "diskSizeBytes": d.size_bytes,
            "diskSizeGB": max(1, d.size_bytes >> 30),
            "provisioningState": "Succeeded",
            "creationData": {"createOption": "Import" if d.source_uri else "Copy", "sourceUri": d.source_uri},
        }
        if d.os_type is not None:
            props["osType"] = d.os_type.value.title()
        body: Json = {"id": d.id, "name": d.name, "location": self.arm.location(), "properties": props}
        if d.managed_by:
            body["managedBy"] = d.managed_by
        return body

    def _nic(self, n: ArmNic) -> Json:
        ip = {
            "privateIPAddress": n.private_ip,
            "privateIPAllocationMethod": "Static" if n.ip_mode.value == "static" else "Dynamic",
            "subnet": {"id": n.subnet_id},
        }
        return {
            "id": n.id,
            "name": n.name,
            "location": self.arm.location(),
            "properties": {
                "provisioningState": "Succeeded",
                "macAddress": n.mac.replace(":", "-").upper(),
                "ipConfigurations": [{"name": "ipconfig1", "properties": ip}],
            },
        }

    def _snapshot(self, s: ArmSnapshot) -> Json:
        return {
            "id": s.id,
            "name": s.name,
            "location": self.arm.location(),
            "properties": {
                "provisioningState": "Succeeded",
                "diskState": s.state,
                "incremental": True,
                "creationData": {"createOption": "Copy", "sourceResourceId": s.disk_id},
            },
        }

    # ---- handlers: (status, body) or an operation --------------------------------------------

    def _find(self, table: dict[str, Any], kind: str, name: str) -> Any:
        if name not in table:
            raise _missing(kind, name)
        return table[name]

    def list_vms(self, _: Json) -> Json:
        return {"value": [self._vm(v) for v in self.arm.list_vms()]}

    def get_vm(self, p: Json) -> Json:
        return self._vm(self._find(self.arm.vms, "virtual machine", p["name"]))

    def vm_view(self, p: Json) -> Json:
        vm = self._find(self.arm.vms, "virtual machine", p["name"])
        power = "running" if vm.power_state is PowerState.ON else "deallocated"
        return {"statuses": [{"code": "ProvisioningState/succeeded"}, {"code": f"PowerState/{power}"}]}

    def put_vm(self, p: Json, body: Json) -> Json:
        props = body.get("properties") or {}
        storage = props.get("storageProfile") or {}
        os_disk = storage.get("osDisk") or {}
        data = sorted(storage.get("dataDisks") or [], key=lambda d: int(d.get("lun", 0)))
        os_disk_id = str((os_disk.get("managedDisk") or {}).get("id", ""))
        data_ids = tuple(str((d.get("managedDisk") or {}).get("id", "")) for d in data)
        if p["name"] in self.arm.vms:  # an update: ARM applies the new storage profile
            return self._vm(self.arm.set_disks(p["name"], os_disk_id, data_ids))
        nics = (props.get("networkProfile") or {}).get("networkInterfaces") or []
        spec = VmCreate(
            name=p["name"],
            size=str((props.get("hardwareProfile") or {}).get("vmSize", "")),
            os_type=OsType(str(os_disk.get("osType", "Linux")).lower()),
            os_disk_id=os_disk_id,
            data_disk_ids=data_ids,
            nic_ids=tuple(str(n.get("id", "")) for n in nics),
            tags=dict(body.get("tags") or {}),
        )
        return self._vm(self.arm.create_vm(spec))

    def delete_vm(self, p: Json) -> None:
        self._find(self.arm.vms, "virtual machine", p["name"])
        self.arm.delete_vm(p["name"])

    def start_vm(self, p: Json) -> None:
        self._find(self.arm.vms, "virtual machine", p["name"])
        self.arm.start_vm(p["name"])

    def deallocate_vm(self, p: Json) -> None:
        self._find(self.arm.vms, "virtual machine", p["name"])
        self.arm.deallocate_vm(p["name"])

    def list_disks(self, _: Json) -> Json:
        return {"value": [self._disk(d) for d in self.arm.list_disks()]}

    def get_disk(self, p: Json) -> Json:
        self._find(self.arm.disks, "disk", p["name"])
        return self._disk(next(d for d in self.arm.list_disks() if d.name == p["name"]))

    def put_disk(self, p: Json, body: Json) -> Json:
        props = body.get("properties") or {}
        creation = props.get("creationData") or {}
        os_raw = str(props.get("osType") or "").lower()
        os_type = OsType(os_raw) if os_raw else None
        option = creation.get("createOption")
        if option == "Import":
            if not creation.get("storageAccountId"):
                raise ArmFault(400, "InvalidParameter", "Import needs storageAccountId.")
            disk = self.arm.import_disk(p["name"], str(creation.get("sourceUri", "")), 0, os_type)
        elif option == "Copy":
            disk = self.arm.disk_from_snapshot(p["name"], str(creation.get("sourceResourceId", "")), os_type)
        elif option == "Upload":
            disk = self.arm.create_upload_disk(p["name"], int(creation.get("uploadSizeBytes", 0)) - 512)
        else:
            raise ArmFault(400, "InvalidParameter", f"createOption {option!r} is not supported by this fake.")
        return self._disk(disk)

    def delete_disk(self, p: Json) -> None:
        self._find(self.arm.disks, "disk", p["name"])
        self.arm.delete_disk(p["name"])

    def grant_disk(self, p: Json, body: Json) -> Json:
        self._find(self.arm.disks, "disk", p["name"])
        seconds = int(body.get("durationInSeconds", 0))
        if body.get("access") == "Write":
            return {"accessSAS": self.arm.disk_write_url(p["name"], seconds)}
        return {"accessSAS": self.arm.disk_read_url(p["name"], seconds)}

    def revoke_disk(self, p: Json) -> None:
        self.arm.end_disk_read(p["name"])

    def list_snapshots(self, _: Json) -> Json:
        return {"value": [self._snapshot(s) for s in self.arm.list_snapshots()]}

    def get_snapshot(self, p: Json) -> Json:
        self._find(self.arm.snapshots, "snapshot", p["name"])
        return self._snapshot(next(s for s in self.arm.list_snapshots() if s.name == p["name"]))

    def put_snapshot(self, p: Json, body: Json) -> Json:
        creation = (body.get("properties") or {}).get("creationData") or {}
        if not (body.get("properties") or {}).get("incremental"):
            raise ArmFault(400, "InvalidParameter", "This fake takes incremental snapshots only.")
        return self._snapshot(self.arm.snapshot_disk(p["name"], str(creation.get("sourceResourceId", ""))))

    def delete_snapshot(self, p: Json) -> None:
        self._find(self.arm.snapshots, "snapshot", p["name"])
        self.arm.delete_snapshot(p["name"])

    def grant_snapshot(self, p: Json, body: Json) -> Json:
        self._find(self.arm.snapshots, "snapshot", p["name"])
        return {"accessSAS": self.arm.snapshot_read_url(p["name"], int(body.get("durationInSeconds", 0)))}

    def revoke_snapshot(self, p: Json) -> None:
        self.arm.end_snapshot_read(p["name"])

    def list_nics(self, _: Json) -> Json:
        return {"value": [self._nic(n) for n in self.arm.list_nics()]}

    def get_nic(self, p: Json) -> Json:
        return self._nic(self._find(self.arm.nics, "network interface", p["name"]))

    def put_nic(self, p: Json, body: Json) -> Json:
        configs = (body.get("properties") or {}).get("ipConfigurations") or [{}]
        ip = configs[0].get("properties") or {}
        static = ip.get("privateIPAllocationMethod") == "Static"
        subnet = str((ip.get("subnet") or {}).get("id", ""))
        return self._nic(
            self.arm.create_nic(p["name"], subnet, str(ip.get("privateIPAddress", "")) if static else "")
        )

    def delete_nic(self, p: Json) -> None:
        self._find(self.arm.nics, "network interface", p["name"])
        self.arm.delete_nic(p["name"])

    def _region(self, p: Json) -> None:
        if p["loc"].lower() not in REGIONS:
            raise ArmFault(
                400, "LocationNotAvailableForResourceType", f"The location '{p['loc']}' is not available."
            )

    def sizes(self, p: Json) -> Json:
        self._region(p)
        return {"value": [_size(s) for s in self.arm.vm_sizes()]}

    def usages(self, p: Json) -> Json:
        self._region(p)
        return {"value": [_usage(u) for u in self.arm.usages()]}

    def list_connections(self, p: Json) -> Json:
        group = f"/subscriptions/{p['sub']}/resourceGroups/{p['rg']}/providers/Microsoft.Network"
        return {
            "value": [
                {
                    "id": f"{group}/connections/{c.name}",
                    "name": c.name,
                    "properties": {
                        "connectionType": "IPsec",
                        "connectionStatus": c.status,
                        "virtualNetworkGateway1": {"id": f"{group}/virtualNetworkGateways/{c.name}-gw"},
                    },
                }
                for c in self.arm.gateway_connections()
            ]
        }

    def get_gateway(self, p: Json) -> Json:
        conn = next((c for c in self.arm.gateway_connections() if f"{c.name}-gw" == p["name"]), None)
        if conn is None:
            raise ArmFault(404, "ResourceNotFound", f"virtual network gateway {p['name']} not found")
        subnet = {"id": f"{conn.vnet_id}/subnets/GatewaySubnet"}
        return {"name": p["name"], "properties": {"ipConfigurations": [{"properties": {"subnet": subnet}}]}}


class Handler(BaseHTTPRequestHandler):
    service: FakeArmService
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        print(f"{self.command} {self.path} -> {args[1] if len(args) > 1 else ''}", flush=True)

    def _send(self, status: int, body: Json | None, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(body).encode() if body is not None else b""
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("x-ms-request-id", str(uuid.uuid4()))
        self.end_headers()
        self.wfile.write(data)

    def _body(self) -> bytes:
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _origin(self) -> str:
        return f"https://{self.headers.get('Host', '127.0.0.1')}"

    def _identity(self, path: str) -> bool:
        """The identity provider's two endpoints; True when `path` was one of them."""
        match = re.fullmatch(r"/(?P<tenant>[^/]+)/v2\.0/\.well-known/openid-configuration", path)
        if match and self.command == "GET":
            base = f"{self._origin()}/{match['tenant']}"
            self._send(
                200,
                {
                    "token_endpoint": f"{base}/oauth2/v2.0/token",
                    "authorization_endpoint": f"{base}/oauth2/v2.0/authorize",
                    "issuer": f"{base}/v2.0",
                    "tenant_region_scope": "fake",
                },
            )
            return True
        if re.fullmatch(r"/[^/]+/oauth2/v2\.0/token", path) and self.command == "POST":
            form = parse_qs(self._body().decode())
            if form.get("client_secret") != [self.service.secret] or form.get("grant_type") != [
                "client_credentials"
            ]:
                self._send(401, {"error": "invalid_client", "error_description": "(fake ARM) wrong secret"})
                return True
            token = secrets.token_urlsafe(24)
            self.service.tokens.add(token)
            self._send(
                200,
                {"token_type": "Bearer", "expires_in": 3600, "ext_expires_in": 3600, "access_token": token},
            )
            return True
        return False

    def _handle(self) -> None:
        url = urlsplit(self.path)
        if self._identity(url.path):
            return
        auth = self.headers.get("Authorization", "")
        if not auth.startswith("Bearer ") or auth[7:] not in self.service.tokens:
            self._body()
            self._send(
                401, {"error": {"code": "AuthenticationFailed", "message": "(fake ARM) no valid token"}}
            )
            return
        if "api-version" not in parse_qs(url.query):
            self._send(
                400, {"error": {"code": "MissingApiVersionParameter", "message": "api-version is required"}}
            )
            return
        op = re.fullmatch(r"/operations/(?P<id>[^/]+)(?P<result>/result)?", url.path)
        if op and self.command == "GET":
            self._operation(op["id"], bool(op["result"]))
            return
        raw = self._body()
        for method, pattern, name in ROUTES:
            match = re.fullmatch(pattern, url.path, flags=re.IGNORECASE)
            if method == self.command and match:
                self._route(name, match.groupdict(), json.loads(raw) if raw else {})
                return
        self._send(
            404,
            {
                "error": {
                    "code": "NoRegisteredProviderFound",
                    "message": f"(fake ARM) {self.command} {url.path}",
                }
            },
        )

    def _route(self, name: str, params: Json, body: Json) -> None:
        handler = getattr(self.service, name)
        try:
            with self.service.lock:
                if params.get("rg") and params["rg"].lower() != self.service.arm.resource_group.lower():
                    raise ArmFault(
                        404, "ResourceGroupNotFound", f"Resource group '{params['rg']}' could not be found."
                    )
                result = (
                    handler(params, body)
                    if self.command in ("PUT", "POST") and name.startswith(("put_", "grant_"))
                    else handler(params)
                )
        except ArmFault as exc:
            self._send(exc.status, {"error": {"code": exc.code, "message": exc.message}})
            return
        except FabricError as exc:  # FakeArm's refusals: what ARM answers 409 Conflict to
            self._send(409, {"error": {"code": "Conflict", "message": exc.message}})
            return
        if self.command == "GET":
            self._send(200, result)
        elif self.command == "PUT" and name not in ("put_disk", "put_snapshot"):
            # VMs and NICs: 201, polled on the resource itself until provisioningState is terminal.
            self._send(201, result, {"Retry-After": "0"})
        else:  # the disk RP's PUTs, POST actions, DELETE: an asynchronous operation, finished here
            op = uuid.uuid4().hex
            self.service.operations[op] = result
            base = f"{self._origin()}/operations/{op}?api-version=2025-04-01"
            self._send(
                202,
                None,
                {"Azure-AsyncOperation": base, "Location": base.replace("?", "/result?"), "Retry-After": "0"},
            )

    def _operation(self, op: str, result: bool) -> None:
        if op not in self.service.operations:
            self._send(404, {"error": {"code": "OperationNotFound", "message": op}})
        elif result:
            body = self.service.operations[op]
            self._send(200 if body is not None else 204, body)
        else:
            self._send(200, {"name": op, "status": "Succeeded"}, {"Retry-After": "0"})

    def do_GET(self) -> None:
        self._handle()

    do_PUT = do_POST = do_DELETE = do_GET


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port-file", type=Path, required=True)
    parser.add_argument("--cert", required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--secret", required=True, help="the one client secret the token endpoint accepts")
    parser.add_argument("--storage", required=True, help="Azurite's connection string")
    parser.add_argument("--container", required=True, help="where the managed disks' page blobs live")
    parser.add_argument("--resource-group", default="rg-recovery")
    parser.add_argument("--core-quota", type=int, default=10)
    parser.add_argument(
        "--connection", action="append", default=[], help="a gateway connection: NAME,STATUS,VNET_ID"
    )
    args = parser.parse_args()
    arm = FakeArm(
        open_container(args.storage, args.container),
        resource_group=args.resource_group,
        core_quota=args.core_quota,
    )
    for spec in args.connection:
        name, status, vnet = spec.split(",", 2)
        arm.connections.append(ArmConnection(name, vnet, status))
    Handler.service = FakeArmService(arm, args.secret)
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(args.cert, args.key)
    server.socket = tls.wrap_socket(server.socket, server_side=True)
    tmp = args.port_file.with_suffix(".tmp")
    tmp.write_text(str(server.server_address[1]))
    tmp.replace(args.port_file)
    server.serve_forever()


if __name__ == "__main__":
    main()
