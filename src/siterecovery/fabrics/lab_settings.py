"""`lab set`: the keys that make each REQUIREMENTS prerequisite true or false in a lab.

An edit names a kind of object (machine, host, datastore, account, site, disk), the object, and
`key=value` assignments (`+=`/`-=` add to or remove from list-valued keys; `rw@esx1=false`
qualifies a key by a host). Every assignment is validated before anything is written: an unknown
key or a bad value raises `LabSettingError` naming the key and what it accepts, and the inventory
stays as it was.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from functools import partial
from pathlib import Path
from typing import TypeVar

from siterecovery.fabrics.base import (
    REQUIRED_PRIVILEGES,
    CloudOrigin,
    DatastoreType,
    HypervisorKind,
    IpMode,
    LicenceEdition,
    OsType,
    ScsiType,
)
from siterecovery.fabrics.lab_build import (
    CONTROLLER_KEY,
    cloud_disk_path,
    make_sparse_image,
    onprem_disk_path,
    parse_size,
)
from siterecovery.fabrics.lab_model import (
    READONLY_PRIVILEGES,
    AccountMode,
    GuestKind,
    LabDatastore,
    LabDisk,
    LabHost,
    LabMachine,
    LabMount,
    LabResourceGroup,
    LabSite,
    LabSnapshot,
    LabState,
)

E = TypeVar("E", bound=StrEnum)
T = TypeVar("T")


class SetKind(StrEnum):
    MACHINE = "machine"
    HOST = "host"
    DATASTORE = "datastore"
    ACCOUNT = "account"
    SITE = "site"
    DISK = "disk"


class Op(StrEnum):
    SET = "="
    ADD = "+="
    REMOVE = "-="


class LabSettingError(ValueError):
    """A `lab set` request that cannot be applied; nothing was changed."""

    def __init__(self, key: str, message: str, allowed: str = "") -> None:
        super().__init__(message + (f" Allowed: {allowed}." if allowed else ""))
        self.key = key
        self.allowed = allowed


@dataclass(frozen=True)
class Assignment:
    key: str
    op: Op
    value: str
    qualifier: str = ""  # the host in `rw@esx1=false`

    @property
    def text(self) -> str:
        return f"{self.key}{'@' + self.qualifier if self.qualifier else ''}{self.op}{self.value}"


_ASSIGNMENT = re.compile(r"^(?P<key>[a-z_]+)(?:@(?P<qual>[\w.-]+))?(?P<op>\+=|-=|=)(?P<value>.*)$", re.S)


def parse_assignment(text: str) -> Assignment:
    match = _ASSIGNMENT.match(text)
    if match is None:
        raise LabSettingError(text, f"{text!r} is not an assignment.", "key=value, key+=value, key-=value")
    return Assignment(match["key"], Op(match["op"]), match["value"].strip(), match["qual"] or "")


# ---- value parsers -----------------------------------------------------------------------------

_TRUE = ("true", "yes", "on", "1")
_FALSE = ("false", "no", "off", "0")


def _bool(a: Assignment) -> bool:
    value = a.value.lower()
    if value in _TRUE or value in _FALSE:
        return value in _TRUE
    raise LabSettingError(a.key, f"{a.key}={a.value!r} is not a boolean.", "true, false")


def _enum(a: Assignment, enum: type[E]) -> E:
    try:
        return enum(a.value.lower())
    except ValueError:
        raise LabSettingError(
            a.key, f"{a.key}={a.value!r} is not allowed.", ", ".join(e.value for e in enum)
        ) from None


def _number(a: Assignment) -> float:
    try:
        value = float(a.value)
    except ValueError:
        value = -1.0
    if value < 0:
        raise LabSettingError(
            a.key, f"{a.key}={a.value!r} is not a non-negative number.", "seconds, e.g. 2 or 0.5"
        )
    return value


def _items(a: Assignment) -> list[str]:
    return [x.strip() for x in a.value.split(",") if x.strip()]


def _only(a: Assignment, *ops: Op) -> None:
    if a.op not in ops:
        raise LabSettingError(a.key, f"{a.key} does not take {a.op!r}.", ", ".join(o.value for o in ops))


def _edit_list(a: Assignment, current: list[str], allowed: Sequence[str] | None = None) -> list[str]:
    items = _items(a)
    if allowed is not None:
        bad = [i for i in items if i not in allowed]
        if bad:
            raise LabSettingError(a.key, f"{a.key}: unknown value(s) {', '.join(bad)}.", ", ".join(allowed))
    if a.op is Op.SET:
        return items
    if a.op is Op.ADD:
        return current + [i for i in items if i not in current]
    return [i for i in current if i not in items]


def _no_qualifier(a: Assignment) -> None:
    if a.qualifier:
        raise LabSettingError(a.key, f"{a.key} takes no @qualifier.")


# ---- per-kind setters --------------------------------------------------------------------------


@dataclass
class _Context:
    state: LabState
    site: LabSite
    lab_dir: Path
    new_files: list[tuple[Path, int]]


MACHINE_KEYS = (
    "os", "os_version", "physical", "scsi", "enableuuid", "tools", "snapshot", "lvm", "host", "template",
    "packages", "ip", "origin", "resource_group", "visible", "workload", "guest_rate", "guest_after",
    "log_owner", "guest",
    "bios_uuid", "disk",
)  # fmt: skip


def _set_machine(ctx: _Context, m: LabMachine, a: Assignment) -> None:
    _no_qualifier(a)
    if a.key not in MACHINE_KEYS:
        raise LabSettingError(a.key, f"Machines have no key {a.key!r}.", ", ".join(MACHINE_KEYS))
    list_keys = ("snapshot", "packages", "disk")
    if a.key not in list_keys:
        _only(a, Op.SET)
    match a.key:
        case "os":
            m.os_type = _enum(a, OsType)
        case "os_version":
            m.os_version = a.value
        case "physical":
            m.physical = _bool(a)
        case "scsi":
            scsi = _enum(a, ScsiType)
            for c in m.controllers:
                c.type = scsi
        case "enableuuid":
            m.extra_config["disk.EnableUUID"] = "TRUE" if _bool(a) else "FALSE"
        case "tools":
            m.tools_running = _bool(a)
        case "snapshot":
            names = _edit_list(a, [s.name for s in m.snapshots])
            kept = {s.name: s for s in m.snapshots}
            m.snapshots = [kept.get(n) or LabSnapshot(id=ctx.state.new_id("snapshot"), name=n) for n in names]
        case "lvm":
            m.on_lvm = _bool(a)
        case "host":
            if ctx.site.find_host(a.value) is None:
                raise LabSettingError(
                    a.key,
                    f"host={a.value!r} is not a host of site {ctx.site.name}.",
                    ", ".join(h.name for h in ctx.site.hosts),
                )
            m.host = a.value
        case "template":
            m.template = a.value
        case "packages":
            m.packages = _edit_list(a, m.packages)
        case "ip":
            mode = _enum(a, IpMode)
            for n in m.nics:
                n.ip_mode = mode
        case "origin":
            m.origin = _enum(a, CloudOrigin)
        case "resource_group":
            if not any(g.name == a.value for g in ctx.site.resource_groups):
                raise LabSettingError(
                    a.key,
                    f"resource_group={a.value!r} is not in site {ctx.site.name}.",
                    ", ".join(g.name for g in ctx.site.resource_groups) or "none",
                )
            m.resource_group = a.value
        case "visible":
            m.visible = _bool(a)
        case "workload":
            m.workload = _bool(a)
        case "guest_rate":
            m.guest_rate = _number(a)
        case "log_owner":
            m.log_owner = a.value
        case "guest":
            m.guest = _enum(a, GuestKind)
        case "guest_after":
            if a.value and ctx.site.find_machine(a.value) is None:
                raise LabSettingError(
                    a.key,
                    f"guest_after={a.value!r} is not a machine of site {ctx.site.name}.",
                    ", ".join(x.name for x in ctx.site.machines),
                )
            m.guest_after = a.value
        case "bios_uuid":
            m.bios_uuid = _uuid(a)
        case "disk":
            _edit_disks(ctx, m, a)


def _uuid(a: Assignment) -> str:
    try:
        return str(uuid.UUID(a.value))
    except ValueError:
        raise LabSettingError(
            a.key,
            f"{a.key}={a.value!r} is not a UUID.",
            "a UUID such as 6f1c2a3e-0d4b-4c5e-8f9a-0b1c2d3e4f50",
        ) from None


def _edit_disks(ctx: _Context, m: LabMachine, a: Assignment) -> None:
    """`disk+=LABEL[:SIZE]` adds a new sparse disk; `disk-=LABEL` removes the disk record."""
    _only(a, Op.ADD, Op.REMOVE)
    for item in _items(a):
        label, _, size_text = item.partition(":")
        if a.op is Op.REMOVE:
            if not any(d.label == label for d in m.disks):
                raise LabSettingError(
                    a.key, f"Machine {m.name} has no disk {label!r}.", ", ".join(d.label for d in m.disks)
                )
            m.disks = [d for d in m.disks if d.label != label]
            continue
        if not re.fullmatch(r"[\w.-]+", label) or any(d.label == label for d in m.disks):
            raise LabSettingError(
                a.key,
                f"disk label {label!r} is empty, not a plain name, or already used on {m.name}.",
                "a new label of letters, digits, '.', '_' or '-'",
            )
        try:
            size = parse_size(size_text) if size_text else ctx.state.disk_size
        except ValueError as exc:
            raise LabSettingError(a.key, str(exc), "sizes like 64M or 1G") from None
        if m.resource_group:
            backing, datastore = cloud_disk_path(m.resource_group, m.name, label), ""
        else:
            datastore = m.disks[0].datastore if m.disks else ctx.site.datastores[0].name
            backing = onprem_disk_path(datastore, m.name, label)
        m.disks.append(
            LabDisk(
                uuid=str(uuid.uuid4()),
                label=label,
                size_bytes=size,
                backing=backing,
                datastore=datastore,
                controller_key=m.controllers[0].key if m.controllers else CONTROLLER_KEY,
            )
        )
        ctx.new_files.append((ctx.lab_dir / backing, size))


HOST_KEYS = ("licence", "kind", "version")


def _set_host(ctx: _Context, h: LabHost, a: Assignment) -> None:
    _no_qualifier(a)
    _only(a, Op.SET)
    match a.key:
        case "licence" | "license":
            h.licence = _enum(a, LicenceEdition)
        case "kind":
            h.kind = _enum(a, HypervisorKind)
        case "version":
            h.version = a.value
        case _:
            raise LabSettingError(a.key, f"Hosts have no key {a.key!r}.", ", ".join(HOST_KEYS))


DATASTORE_KEYS = ("type", "accessible", "capacity", "rw@HOST", "mount@HOST")


def _set_datastore(ctx: _Context, ds: LabDatastore, a: Assignment) -> None:
    _only(a, Op.SET)
    if a.key in ("rw", "mount"):
        if ctx.site.find_host(a.qualifier) is None:
            raise LabSettingError(
                a.key,
                f"{a.key}@{a.qualifier or '?'} names no host of site {ctx.site.name}.",
                ", ".join(f"{a.key}@{h.name}" for h in ctx.site.hosts),
            )
        on = _bool(a)
        mount = next((x for x in ds.mounts if x.host == a.qualifier), None)
        if a.key == "mount":
            ds.mounts = [x for x in ds.mounts if x.host != a.qualifier]
            if on:
                ds.mounts.append(mount or LabMount(host=a.qualifier, read_write=True))
        elif mount is None:
            raise LabSettingError(
                a.key,
                f"Datastore {ds.name} is not mounted on {a.qualifier}.",
                f"mount@{a.qualifier}=true first",
            )
        else:
            mount.read_write = on
        return
    _no_qualifier(a)
    match a.key:
        case "type":
            ds.type = _enum(a, DatastoreType)
        case "accessible":
            ds.accessible = _bool(a)
        case "capacity":
            try:
                ds.capacity_bytes = parse_size(a.value)
            except ValueError as exc:
                raise LabSettingError(a.key, str(exc), "sizes like 500G or 1T") from None
        case _:
            raise LabSettingError(a.key, f"Datastores have no key {a.key!r}.", ", ".join(DATASTORE_KEYS))


ACCOUNT_KEYS = ("privileges",)
KNOWN_PRIVILEGES = tuple(dict.fromkeys((*READONLY_PRIVILEGES, *REQUIRED_PRIVILEGES)))


def _set_account(ctx: _Context, mode: AccountMode, assignments: Sequence[Assignment]) -> None:
    account = ctx.site.account
    account.mode = mode
    account.privileges = list(REQUIRED_PRIVILEGES if mode is AccountMode.FULL else READONLY_PRIVILEGES)
    for a in assignments:
        _no_qualifier(a)
        if a.key != "privileges":
            raise LabSettingError(a.key, f"Accounts have no key {a.key!r}.", ", ".join(ACCOUNT_KEYS))
        account.privileges = _edit_list(a, account.privileges, KNOWN_PRIVILEGES)


SITE_KEYS = (
    "reachable",
    "agent_registration_delay",
    "location",
    "resource_group",
    "control_server",
    "passphrase_file",
)


def _set_site(ctx: _Context, site: LabSite, a: Assignment) -> None:
    _no_qualifier(a)
    if a.key != "resource_group":
        _only(a, Op.SET)
    match a.key:
        case "reachable":
            site.reachable = _bool(a)
        case "agent_registration_delay":
            site.agent_registration_delay = _number(a)
        case "location":
            site.location = a.value
        case "control_server":
            site.control_server = a.value
        case "passphrase_file":
            site.passphrase_file = a.value
        case "resource_group":
            _only(a, Op.ADD, Op.REMOVE)
            names = _edit_list(a, [g.name for g in site.resource_groups])
            known = {g.name: g for g in site.resource_groups}
            site.resource_groups = [
                known.get(n) or LabResourceGroup(name=n, location=site.location) for n in names
            ]
        case _:
            raise LabSettingError(a.key, f"Sites have no key {a.key!r}.", ", ".join(SITE_KEYS))


DISK_KEYS = ("uuid", "label")


def _set_disk(ctx: _Context, d: LabDisk, a: Assignment) -> None:
    _no_qualifier(a)
    _only(a, Op.SET)
    match a.key:
        case "uuid":
            # `uuid=@mt-linux/disk0` copies another disk's UUID: the template clash of RP-UUID.
            d.uuid = _find_disk(ctx.site, a.value[1:]).uuid if a.value.startswith("@") else _uuid(a)
        case "label":
            d.label = a.value
        case _:
            raise LabSettingError(a.key, f"Disks have no key {a.key!r}.", ", ".join(DISK_KEYS))


def _find_disk(site: LabSite, ident: str) -> LabDisk:
    machine, _, label = ident.partition("/")
    for m in site.machines:
        for d in m.disks:
            if d.uuid == ident or (m.name == machine and d.label == label):
                return d
    raise LabSettingError("disk", f"Site {site.name} has no disk {ident!r}.", "MACHINE/LABEL or a disk UUID")


def _target(found: T | None, kind: SetKind, name: str, choices: Sequence[str]) -> T:
    if found is None:
        raise LabSettingError(kind.value, f"There is no {kind.value} {name!r}.", ", ".join(choices))
    return found


def apply_settings(
    state: LabState, lab_dir: Path, site_name: str, kind: SetKind, name: str, assignments: Sequence[str]
) -> None:
    """Apply one `lab set` request to `state` (in memory); raises LabSettingError on any bad input."""
    parsed = [parse_assignment(text) for text in assignments]
    if kind is SetKind.SITE:
        site = _target(state.sites.get(name), kind, name, list(state.sites))
    else:
        site = _target(state.sites.get(site_name), SetKind.SITE, site_name, list(state.sites))
    ctx = _Context(state, site, lab_dir, [])
    setter: Callable[[Assignment], None]
    match kind:
        case SetKind.MACHINE:
            m = _target(site.find_machine(name), kind, name, [x.name for x in site.machines])
            setter = partial(_set_machine, ctx, m)
        case SetKind.HOST:
            h = _target(site.find_host(name), kind, name, [x.name for x in site.hosts])
            setter = partial(_set_host, ctx, h)
        case SetKind.DATASTORE:
            ds = _target(site.find_datastore(name), kind, name, [x.name for x in site.datastores])
            setter = partial(_set_datastore, ctx, ds)
        case SetKind.ACCOUNT:
            mode = _target(
                next((m for m in AccountMode if m.value == name), None),
                kind,
                name,
                [m.value for m in AccountMode],
            )
            _set_account(ctx, mode, parsed)
            return  # an account edit is one step: the mode resets privileges, then the keys adjust
        case SetKind.SITE:
            setter = partial(_set_site, ctx, site)
        case SetKind.DISK:
            d = _find_disk(site, name)
            setter = partial(_set_disk, ctx, d)
    for a in parsed:
        setter(a)
    for path, size in ctx.new_files:
        make_sparse_image(path, size)
