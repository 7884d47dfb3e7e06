"""`fabrics add|list|show|discover|credentials|remove` and `machines list --fabric`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from siterecovery.cli.output import emit
from siterecovery.cli.state import as_json, call

fabrics_app = typer.Typer(help="Sites: a lab folder or a vCenter.", no_args_is_help=True)
add_app = typer.Typer(help="Add a fabric and discover it.", no_args_is_help=True)
machines_app = typer.Typer(help="Machines discovered on a fabric.", no_args_is_help=True)
fabrics_app.add_typer(add_app, name="add")

_COLUMNS = ("name", "kind", "site", "last_discovery_at", "discovery_error", "summary", "id")


def _show(ctx: typer.Context, data: Any) -> None:
    if as_json(ctx):
        emit(data, True)
        return
    rows = data if isinstance(data, list) else [data]
    emit([{**row, "summary": _summary_text(row.get("summary") or {})} for row in rows], False, _COLUMNS)


def _summary_text(summary: dict[str, Any]) -> str:
    """ "2 hosts, 3 datastores, 5 machines; 1 warning: …" rather than the summary's JSON in a cell."""
    counts = ", ".join(
        f"{count} {key.replace('_', ' ')}" for key, count in summary.items() if key != "warnings" and count
    )
    warnings = summary.get("warnings") or []
    noted = (
        f"; {len(warnings)} warning{'s' if len(warnings) > 1 else ''}: {' '.join(warnings)}"
        if warnings
        else ""
    )
    return (counts or "empty") + noted


def _read_secret(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError as exc:
        typer.echo(f"error [invalid-input] cannot read password file {path}: {exc.strerror}", err=True)
        raise typer.Exit(2) from None


@add_app.command("lab")
def add_lab(
    ctx: typer.Context,
    path: Path,
    site: Annotated[str, typer.Option(help="onprem | cloud")],
    name: Annotated[str | None, typer.Option(help="default: the site name")] = None,
) -> None:
    """Add one site of a lab folder (`siterecovery lab create DIR`)."""
    body = {
        "name": name or site,
        "kind": "lab",
        "site": site,
        "connection": {"path": str(path.resolve()), "site": site},
    }
    _show(ctx, call(ctx, lambda api: api.post("/api/fabrics", body)))


@add_app.command("vsphere")
def add_vsphere(
    ctx: typer.Context,
    name: Annotated[str, typer.Option()],
    host: Annotated[str, typer.Option()],
    user: Annotated[str, typer.Option()],
    password_file: Annotated[Path, typer.Option()],
    port: int = 443,
    insecure: bool = False,
    site: str = "onprem",
    datacenter: str | None = None,
) -> None:
    """Add a vCenter; the password is stored encrypted and never shown again."""
    connection: dict[str, Any] = {"host": host, "port": port, "user": user, "insecure": insecure}
    if datacenter:
        connection["datacenter"] = datacenter
    body = {
        "name": name,
        "kind": "vsphere",
        "site": site,
        "connection": connection,
        "secret": _read_secret(password_file),
    }
    _show(ctx, call(ctx, lambda api: api.post("/api/fabrics", body)))


@add_app.command("azure")
def add_azure(
    ctx: typer.Context,
    subscription: Annotated[str, typer.Option(help="subscription id")],
    resource_group: Annotated[str, typer.Option(help="the recovery site's resource group")],
    storage_account: Annotated[str, typer.Option(help="holds the replica page blobs")],
    location: Annotated[str, typer.Option(help="region, e.g. westeurope")],
    subnet_id: Annotated[str, typer.Option(help="ARM id of the subnet failed-over VMs join")],
    name: str = "azure",
    site: str = "cloud",
    tenant: str = "",
    client_id: Annotated[
        str, typer.Option(help="service principal; without it the server's own identity")
    ] = "",
    client_secret_file: Annotated[Path | None, typer.Option(help="the service principal's secret")] = None,
    vm_size: str = "",
    replica_container: str = "",
    arm_endpoint: Annotated[
        str, typer.Option(help="another cloud's Resource Manager (sovereign cloud, Azure Stack Hub)")
    ] = "",
    authority_host: Annotated[str, typer.Option(help="that cloud's identity provider")] = "",
    sas_seconds: Annotated[
        int, typer.Option(help="how long failback's read access to a disk lasts (default 4 hours)")
    ] = 0,
    blob_endpoint: Annotated[
        str, typer.Option(help="the storage account's blob endpoint, if not <account>.blob.core.windows.net")
    ] = "",
) -> None:
    """Add an Azure resource group as a recovery site; the client secret is stored encrypted."""
    connection: dict[str, Any] = {
        "subscription": subscription,
        "resource_group": resource_group,
        "storage_account": storage_account,
        "location": location,
        "subnet_id": subnet_id,
    }
    optional = {
        "tenant": tenant,
        "client_id": client_id,
        "vm_size": vm_size,
        "replica_container": replica_container,
        "arm_endpoint": arm_endpoint,
        "authority_host": authority_host,
        "blob_endpoint": blob_endpoint,
    }
    connection |= {key: value for key, value in optional.items() if value}
    if sas_seconds:
        connection["sas_seconds"] = sas_seconds
    body = {
        "name": name,
        "kind": "azure",
        "site": site,
        "connection": connection,
        "secret": _read_secret(client_secret_file) if client_secret_file else "",
    }
    _show(ctx, call(ctx, lambda api: api.post("/api/fabrics", body)))


@add_app.command("libvirt")
def add_libvirt(
    ctx: typer.Context,
    uri: Annotated[str, typer.Option(help="qemu:///system, qemu+ssh://user@host/system, ...")],
    name: str = "libvirt",
    site: str = "onprem",
    domain_type: Annotated[
        str, typer.Option(help="kvm | qemu (TCG) for domains the fabric creates; default kvm when offered")
    ] = "",
) -> None:
    """Add a libvirt host (KVM/QEMU); its credentials are the URI's (SSH keys, SASL, TLS)."""
    connection: dict[str, Any] = {"uri": uri}
    if domain_type:
        connection["domain_type"] = domain_type
    body = {"name": name, "kind": "libvirt", "site": site, "connection": connection}
    _show(ctx, call(ctx, lambda api: api.post("/api/fabrics", body)))


@fabrics_app.command("remove")
def fabrics_remove(ctx: typer.Context, fabric: str) -> None:
    """Forget a site and its credentials (refused while a protected item lives there)."""
    call(ctx, lambda api: api.request("DELETE", f"/api/fabrics/{fabric}"))
    typer.echo(f"fabric {fabric} removed")


@fabrics_app.command("list")
def fabrics_list(ctx: typer.Context) -> None:
    _show(ctx, call(ctx, lambda api: api.get("/api/fabrics")))


@fabrics_app.command("show")
def fabrics_show(ctx: typer.Context, fabric: str) -> None:
    _show(ctx, call(ctx, lambda api: api.get(f"/api/fabrics/{fabric}")))


@fabrics_app.command("discover")
def fabrics_discover(ctx: typer.Context, fabric: str) -> None:
    """Discover the fabric's inventory now."""
    _show(ctx, call(ctx, lambda api: api.post(f"/api/fabrics/{fabric}/discover")))


@fabrics_app.command("credentials")
def fabrics_credentials(
    ctx: typer.Context, fabric: str, password_file: Annotated[Path, typer.Option()], user: str | None = None
) -> None:
    """Replace the fabric's account (e.g. after a read-only account hid the datastores) and rediscover."""
    current = call(ctx, lambda api: api.get(f"/api/fabrics/{fabric}"))
    connection = dict(current["connection"])
    if user:
        connection["user"] = user
    body = {"connection": connection, "secret": _read_secret(password_file)}
    _show(ctx, call(ctx, lambda api: api.request("PUT", f"/api/fabrics/{fabric}/credentials", json=body)))


@machines_app.command("list")
def machines_list(ctx: typer.Context, fabric: Annotated[str, typer.Option("--fabric")]) -> None:
    rows = call(ctx, lambda api: api.get(f"/api/fabrics/{fabric}/machines"))
    if as_json(ctx):
        emit(rows, True)
        return
    view = [
        {
            "name": m["name"],
            "os": m["os_type"],
            "power": m["power_state"],
            "host": m["host"] or m["resource_group"],
            "disks": len(m["disks"]),
            "bios_uuid": m["bios_uuid"],
        }
        for m in rows
    ]
    emit(view, False, ("name", "os", "power", "host", "disks", "bios_uuid"))
