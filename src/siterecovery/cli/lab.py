"""`siterecovery lab …`: create, inspect, edit and run an embedded lab folder.

These commands work on the lab folder directly (the lab is this machine's hypervisor and cloud,
not a client of the configuration server). `lab set` is how an operator or a test makes a
REQUIREMENTS prerequisite pass or fail; `lab power`, `lab crash` and `lab verify` run a lab
machine's guest and ask the crash-consistency oracle about its disk; `lab quiesce` and `lab thaw`
freeze and thaw the guest (the mobility agent's freeze and thaw hooks).
"""

from __future__ import annotations

import json
from dataclasses import asdict
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.table import Table

from siterecovery.cli.output import fit
from siterecovery.cli.state import as_json
from siterecovery.fabrics.base import FabricError, Inventory, Machine, PowerState, SiteKind
from siterecovery.fabrics.lab_build import DEFAULT_DISK_SIZE, create_lab, parse_size
from siterecovery.fabrics.lab_model import ONPREM, Accel, GuestKind
from siterecovery.fabrics.lab_settings import LabSettingError, SetKind, apply_settings
from siterecovery.fabrics.lab_store import LabStore

if TYPE_CHECKING:
    from siterecovery.lab.fabric import LabFabric
    from siterecovery.lab.oracle import OracleVerdict

# The lab's fabric, guests, oracle and VM image load when a `lab` command needs them, not when
# the CLI starts: every `siterecovery` process (agents, servers) would pay for them otherwise
# (start-up cost, not an import cycle).

console = Console()
err = Console(stderr=True)

lab_app = typer.Typer(help="Embedded lab: two simulated sites in a folder.", no_args_is_help=True)

LabDir = Annotated[Path, typer.Argument(help="The lab folder.")]
SiteOpt = Annotated[str, typer.Option("--site", help="Site: onprem or cloud.")]


class PowerAction(StrEnum):
    ON = "on"
    OFF = "off"


def register(app: typer.Typer) -> None:
    """Add the `lab` command group to the main CLI."""
    app.add_typer(lab_app, name="lab")


def _fail(exc: FabricError) -> typer.Exit:
    err.print(f"[red]error[/red] {exc.code}: {exc.message}")
    if exc.remediation:
        err.print(f"  {exc.remediation}")
    return typer.Exit(1)


def _fabric(lab_dir: Path, site: str) -> LabFabric:
    # The lab CLI is the simulated hypervisor's own administrator, so the site account's
    # privileges (which the product is held to) do not limit it.
    from siterecovery.lab.fabric import LabFabric  # start-up cost (see the imports)

    return LabFabric(lab_dir, site, enforce_privileges=False)


def _machine(fabric: LabFabric, name: str) -> Machine:
    machine = fabric.discover().machine(name)
    if machine is None:
        raise FabricError(
            "machine-not-found",
            f"Site {fabric.site} has no visible machine {name!r}.",
            "List the machines with `siterecovery lab show DIR`.",
        )
    return machine


@lab_app.command("create")
def create(
    lab_dir: LabDir,
    disk_size: Annotated[str, typer.Option(help="Size of every disk image, e.g. 64M or 1G.")] = "64M",
    guest: Annotated[
        GuestKind, typer.Option(help="The machines' guest: the Python log writer or a real Linux VM.")
    ] = GuestKind.PYTHON,
    accel: Annotated[Accel, typer.Option(help="VM guests: kvm, tcg or auto.")] = Accel.AUTO,
) -> None:
    """Create a lab with an on-premises and a cloud site."""
    try:
        size = parse_size(disk_size) if disk_size else DEFAULT_DISK_SIZE
    except ValueError as exc:
        err.print(f"[red]error[/red] --disk-size: {exc}")
        raise typer.Exit(2) from None
    try:
        state = create_lab(lab_dir, size, guest, accel)
    except FabricError as exc:
        raise _fail(exc) from None
    machines = ", ".join(m.name for m in state.sites[ONPREM].machines)
    console.print(
        f"Created lab {lab_dir.resolve()} (sites onprem, cloud; machines {machines}; {guest.value} guests)."
    )


@lab_app.command("image")
def image(
    ctx: typer.Context,
    probe: Annotated[bool, typer.Option(help="Probe again whether KVM boots the guest.")] = False,
) -> None:
    """Build (on first use) or show the VM guests' image, and whether KVM can boot it."""
    from siterecovery.lab.vm.image import cache_root, ensure_image, probe_kvm  # start-up cost

    try:
        built = ensure_image()
        kvm = probe_kvm(built, refresh=probe)
    except FabricError as exc:
        raise _fail(exc) from None
    if as_json(ctx):
        out = {**asdict(built), "folder": str(built.folder), "kvm": asdict(kvm), "cache": str(cache_root())}
        typer.echo(json.dumps(out, indent=2))
        return
    console.print(f"image   {built.folder}")
    console.print(f"kernel  {built.kernel_version} ({built.kernel_bytes >> 20} MiB)")
    console.print(f"initrd  {built.initrd_bytes / 2**20:.1f} MiB (busybox, e2fsprogs, virtio modules, /init)")
    accel = "kvm" if kvm.kvm else "tcg"
    console.print(f"accel   {accel} when auto ({kvm.reason}; probed in {kvm.seconds:.1f} s)")


@lab_app.command("show")
def show(
    ctx: typer.Context,
    lab_dir: LabDir,
    site: Annotated[str | None, typer.Option("--site", help="Only this site.")] = None,
) -> None:
    """Show the lab's inventory."""
    try:
        state = LabStore(lab_dir).read()
    except FabricError as exc:
        raise _fail(exc) from None
    if site is not None and site not in state.sites:
        err.print(f"[red]error[/red] --site: no site {site!r}. Allowed: {', '.join(state.sites)}.")
        raise typer.Exit(2)
    if as_json(ctx):
        data = state.model_dump(mode="json")
        if site is not None:
            data["sites"] = {site: data["sites"][site]}
        typer.echo(json.dumps(data, indent=2))
        return
    for name in [site] if site else list(state.sites):
        try:
            vms = {m.name for m in state.sites[name].machines if state.guest_of(m) is GuestKind.VM}
            _print_inventory(_fabric(lab_dir, name).discover(), state.sites[name].account.mode.value, vms)
        except FabricError as exc:
            err.print(f"[yellow]site {name}[/yellow]: {exc.message}")


def _yes(flag: bool) -> str:
    return "yes" if flag else "[red]no[/red]"


def _print_inventory(
    inv: Inventory, account: str, vm_guests: set[str] | frozenset[str] = frozenset()
) -> None:
    console.rule(f"site {inv.site} ({inv.kind.value}), account {account}")
    for warning in inv.warnings:
        console.print(f"[yellow]warning[/yellow] {warning}")
    if inv.hosts:
        hosts = Table("host", "id", "kind", "licence", "version", title="Hosts")
        for h in inv.hosts:
            hosts.add_row(h.name, h.id, h.kind.value, h.licence.value, h.version)
        console.print(fit(hosts, console))
    if inv.datastores:
        stores = Table(
            "datastore", "id", "type", "accessible", "capacity GiB", "free GiB", "mounts", title="Datastores"
        )
        for d in inv.datastores:
            mounts = ", ".join(f"{m.host}:{'rw' if m.read_write else 'ro'}" for m in d.mounts)
            stores.add_row(
                d.name,
                d.id,
                d.type.value,
                _yes(d.accessible),
                f"{d.capacity_bytes / 2**30:.0f}",
                f"{d.free_bytes / 2**30:.1f}",
                mounts,
            )
        console.print(fit(stores, console))
    if inv.resource_groups:
        groups = Table("resource group", "location", title="Resource groups")
        for g in inv.resource_groups:
            groups.add_row(g.name, g.location)
        console.print(fit(groups, console))
    machines = Table(
        "machine",
        "id",
        "where",
        "os",
        "power",
        "scsi",
        "tools",
        "EnableUUID",
        "snapshots",
        "disks",
        "nics",
        "notes",
        title="Machines",
    )
    for m in inv.machines:
        where = m.host if inv.kind is SiteKind.VCENTER else m.resource_group
        notes = [n for n, on in (("physical", m.physical), ("lvm", m.on_lvm)) if on]
        notes += [f"origin={m.origin.value}"] if m.origin else []
        notes += [f"template={m.template}"] if m.template else []
        notes += ["guest=vm"] if m.name in vm_guests else []
        machines.add_row(
            m.name,
            m.id,
            where,
            f"{m.os_type.value} {m.os_version}",
            m.power_state.value,
            ",".join(c.type.value for c in m.controllers),
            _yes(m.tools_running),
            m.extra_config.get("disk.EnableUUID", "-"),
            ",".join(s.name for s in m.snapshots) or "-",
            "\n".join(f"{d.label} {d.size_bytes >> 20}M {d.uuid[:8]}" for d in m.disks),
            "\n".join(f"{n.name} {n.ip_mode.value} {n.address}".strip() for n in m.nics),
            " ".join(notes),
        )
    console.print(fit(machines, console))


@lab_app.command("set")
def set_(
    lab_dir: LabDir,
    kind: Annotated[SetKind, typer.Argument(help="What to change.")],
    name: Annotated[str, typer.Argument(help="Its name (account: full or readonly; disk: MACHINE/LABEL).")],
    assignments: Annotated[list[str] | None, typer.Argument(help="key=value, key+=value, key-=value")] = None,
    site: SiteOpt = ONPREM,
) -> None:
    """Change the lab's inventory; the next discovery sees the change."""
    store = LabStore(lab_dir)
    try:
        with store.edit() as state:
            apply_settings(state, store.lab_dir, site, kind, name, assignments or [])
    except LabSettingError as exc:
        err.print(f"[red]error[/red] {exc.key}: {exc}")
        raise typer.Exit(2) from None
    except FabricError as exc:
        raise _fail(exc) from None
    console.print(f"{kind.value} {name}: {' '.join(assignments or []) or 'set'}")


@lab_app.command("power")
def power(lab_dir: LabDir, machine: str, action: PowerAction, site: SiteOpt = ONPREM) -> None:
    """Power a machine on (starts its agent export and guest) or off (stops them cleanly)."""
    fabric = _fabric(lab_dir, site)
    try:
        if action is PowerAction.ON:
            fabric.power_on(machine)
        else:
            fabric.power_off(machine)
    except FabricError as exc:
        raise _fail(exc) from None
    console.print(f"{machine}: powered {action.value}")


@lab_app.command("crash")
def crash(lab_dir: LabDir, machine: str, site: SiteOpt = ONPREM) -> None:
    """kill -9 the machine's guest (its disk keeps what was written); `lab power on` restarts it."""
    from siterecovery.lab import runtime  # start-up cost (see the imports)

    fabric = _fabric(lab_dir, site)
    try:
        name = _machine(fabric, machine).name
    except FabricError as exc:
        raise _fail(exc) from None
    if not runtime.crash_guest(fabric.lab_dir, site, name):
        err.print(f"[red]error[/red] guest-not-running: machine {name} has no running guest.")
        raise typer.Exit(1)
    console.print(f"{name}: guest killed")


@lab_app.command("quiesce")
def quiesce(lab_dir: LabDir, machine: str, site: SiteOpt = ONPREM) -> None:
    """Freeze the guest: it flushes, writes a quiesce marker and pauses (the agent's freeze hook)."""
    from siterecovery.lab import runtime  # start-up cost (see the imports)

    try:
        seq = runtime.quiesce(lab_dir, site, machine)
    except FabricError as exc:
        raise _fail(exc) from None
    console.print(f"{machine}: quiesced at record {seq}")


@lab_app.command("thaw")
def thaw(lab_dir: LabDir, machine: str, site: SiteOpt = ONPREM) -> None:
    """Let a quiesced guest write again (the agent's thaw hook)."""
    from siterecovery.lab import runtime  # start-up cost (see the imports)

    try:
        runtime.thaw(lab_dir, site, machine)
    except FabricError as exc:
        raise _fail(exc) from None
    console.print(f"{machine}: thawed")


def verify_machine(fabric: LabFabric, machine: Machine) -> OracleVerdict:
    """The oracle's verdict on a machine's log disk: through its export when running, else the file."""
    # Start-up cost (see the imports).
    from siterecovery.dataplane.nbd_client import NbdClient
    from siterecovery.lab import runtime
    from siterecovery.lab.oracle import verify_image, verify_log

    if not machine.disks:
        raise FabricError(
            "machine-has-no-disks",
            f"Machine {machine.name} has no disks.",
            "Verify a machine with a log disk.",
        )
    disk = machine.disks[0]
    running = machine.power_state is PowerState.ON and runtime.export_running(
        fabric.lab_dir, fabric.site, machine.name
    )
    if fabric.guest_kind(machine.name) is GuestKind.VM:
        alive = running and runtime.guest_running(fabric.lab_dir, fabric.site, machine.name)
        return _verify_vm(fabric, machine, alive)
    if running:
        sock = runtime.agent_socket(fabric.run_dir(machine.name), disk.label)
        with NbdClient.connect(disk.label, unix=sock) as client:
            return verify_log(
                lambda off, n: client.pread(n, off),
                client.size,
                fabric.log_owner(machine.name),
                data_ranges=client.data_ranges(),  # skip what the export reports as zeroes
            )
    return verify_image(disk.backing, fabric.log_owner(machine.name))


def _verify_vm(fabric: LabFabric, machine: Machine, running: bool) -> OracleVerdict:
    """A VM guest's disk is ext4: while the guest runs, its own boot verdict (the file system is
    mounted in the guest, so the host cannot check it); when it is off or crashed, the same checks
    from the host on the disk image (the journal replayed on a copy first)."""
    # Start-up cost (see the imports).
    from siterecovery.lab import runtime
    from siterecovery.lab.oracle import OracleVerdict
    from siterecovery.lab.vm.fs_oracle import verify_fs_image

    owner = fabric.log_owner(machine.name)
    if running:
        status = runtime.guest_status(fabric.lab_dir, fabric.site, machine.name)
        if status is None or not status.start_verdict:
            raise FabricError(
                "guest-not-responding",
                f"The VM guest of {machine.name} has not reported its boot verdict yet.",
                "Wait for it to boot (see console.log in its run folder) and verify again.",
            )
        v = status.start_verdict
        ok, listed = bool(v.get("ok")), v.get("quiesce_markers")
        markers = tuple(int(m) for m in listed) if isinstance(listed, list) else ()
        return OracleVerdict(
            ok, int(str(v.get("records", 0))), None if ok else int(str(v.get("first_bad"))),
            f"at boot: {v.get('reason')}; {status.flushed} files fsync'd by now", owner, markers,
        )  # fmt: skip
    verdict, fs = verify_fs_image(Path(machine.disks[0].backing), owner)
    replay = "journal replayed, " if fs.needed_replay else ""
    reason = f"ext4 {replay}e2fsck -fn exit {fs.fsck_rc}; {verdict.reason}"
    return OracleVerdict(
        verdict.ok, verdict.records, verdict.first_bad, reason, verdict.machine, verdict.quiesce_markers,
        verdict.torn_tail,
    )  # fmt: skip


@lab_app.command("verify")
def verify(
    ctx: typer.Context,
    lab_dir: LabDir,
    machine: str,
    site: SiteOpt = ONPREM,
) -> None:
    """Check that the machine's disk holds a clean prefix of its guest's log (exit 1 if not)."""
    fabric = _fabric(lab_dir, site)
    try:
        verdict = verify_machine(fabric, _machine(fabric, machine))
    except FabricError as exc:
        raise _fail(exc) from None
    if as_json(ctx):
        typer.echo(json.dumps(verdict.as_dict()))
    elif verdict.ok:
        console.print(f"{machine}: [green]ok[/green] — {verdict.reason}")
    else:
        console.print(f"{machine}: [red]FAILED[/red] at record {verdict.first_bad} — {verdict.reason}")
    if not verdict.ok:
        raise typer.Exit(1)


@lab_app.command("move")
def move(lab_dir: LabDir, machine: str, datastore: str, site: SiteOpt = ONPREM) -> None:
    """Storage-migrate a machine's disks to another datastore (what RP-MT-MOVE forbids)."""
    try:
        _fabric(lab_dir, site).move_storage(machine, datastore)
    except FabricError as exc:
        raise _fail(exc) from None
    console.print(f"{machine}: disks moved to {datastore}")


@lab_app.command("delete")
def delete(lab_dir: LabDir, machine: str, site: SiteOpt = ONPREM) -> None:
    """Delete a powered-off machine and its own disk files."""
    try:
        _fabric(lab_dir, site).delete_machine(machine)
    except FabricError as exc:
        raise _fail(exc) from None
    console.print(f"{machine}: deleted")
