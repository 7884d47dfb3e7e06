"""Every prerequisite rule of REQUIREMENTS §1-2, through the real lab and the real services.

One deployment for the module: web1 is protected, failed over and committed once, so a
reprotect what-if is clean. Each case then makes the lab (or a component, or the request) break
one rule, and shows that `reprotect --what-if` reports exactly that code and that the real
reprotect refuses with the same list, before anything changed: no job was created, no machine
was powered on or off, no disk was attached anywhere. The case is undone in a `finally` and the
baseline is checked clean again, so cases cannot lean on each other.

Lab edits go through `apply_settings` on the lab's store: the very code `siterecovery lab set`
runs, without paying a Python start-up per edit.

What the lab and the services cannot produce, and so is not faked here:
- CS-1 when the item exists but its record lost the machine or its disks (`machine_recorded`):
  no API leaves a record like that; the case here is a machine the database does not know at all.
- A cloud VM or on-premises machine deleted for real while the module still needs it: those cases
  hide the VM from discovery (`visible=false`), which is exactly what the checks see after a
  deletion. Disabled protection is a real `disable` job (on win1, the module's last use of it).
- RP-W2K8 and RP-GROUP-OS share win1, the lab's one Windows machine, so the W2K8 case also lists
  the group rules win1 breaks by being reprotected on its own.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import pytest

from siterecovery.api_client import ApiError
from siterecovery.demo.cycle import Cycle
from siterecovery.demo.environment import Environment
from siterecovery.fabrics.lab_settings import SetKind, apply_settings
from siterecovery.fabrics.lab_store import LabStore
from siterecovery.lab import runtime
from siterecovery.lab.fabric import LabFabric
from tests.conftest import run_cli
from tests.e2e.conftest import (
    fail_over_and_commit,
    protect,
    reprotect_body,
    run_job,
)

# A stopped component counts as disconnected once its heartbeat is older than HEARTBEAT_TIMEOUT;
# a restarted one is connected after its first heartbeat. Generous (a loaded 2-core box starts a
# component in tens of seconds): it bounds a wait for what always comes, never a negative check.
WAIT = 120.0
W2K8 = "Windows Server 2008 R2 SP1"
LOCK_FILE = ".siterecovery-locked"  # dataplane.retention: a volume holding it is locked (RP-RET)

Env = Environment
Step = Callable[[Env], None]


def _nothing(env: Env) -> None:
    pass


def lab_set(env: Env, kind: str, name: str, *assignments: str, site: str = "onprem") -> None:
    store = LabStore(env.lab_dir)
    with store.edit() as state:
        apply_settings(state, store.lab_dir, site, SetKind(kind), name, assignments)


def wait_until(what: str, ready: Callable[[], bool], timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.2)


def body(env: Env, **overrides: Any) -> dict[str, Any]:
    """`reprotect_body`, asking the master target for its volume only when the request names none
    (with the only volume locked there is none to ask for)."""
    if "retention_volume" in overrides:
        return {
            "master_target": "mt-linux",
            "process_server": "ps-cloud",
            "datastore": "ds-vmfs1",
            **overrides,
        }
    return reprotect_body(env, **overrides)


def what_if(env: Env, machine: str, **overrides: Any) -> list[str]:
    """The codes `reprotect --what-if` reports (a refusal before any check, e.g. CS-1, counts too)."""
    try:
        out = env.api.post(
            f"/api/replicatedItems/{machine}/reprotect", {**body(env, **overrides), "what_if": True}
        )
    except ApiError as exc:
        return [str(p.get("code")) for p in exc.problems]
    return [str(p["code"]) for p in out["problems"]]


def readiness(env: Env, machine: str, **overrides: Any) -> dict[str, Any]:
    out: dict[str, Any] = env.api.post(
        f"/api/replicatedItems/{machine}/reprotect", {**body(env, **overrides), "what_if": True}
    )
    return out


def world(env: Env) -> tuple[Any, ...]:
    """What a refused operation must leave alone: the jobs, every machine's power and disks."""
    jobs = sorted(j["id"] for j in env.api.get("/api/jobs", limit=1000))
    state = LabStore(env.lab_dir).read()
    machines = sorted(
        (
            site,
            m.name,
            str(m.power_state),
            tuple(sorted(d.uuid for d in m.disks)),
            tuple(s.name for s in m.snapshots),
        )
        for site, s in state.sites.items()
        for m in s.machines
    )
    return jobs, machines


def volumes(env: Env, master_target: str) -> dict[str, dict[str, Any]]:
    server = next(s for s in env.api.get("/api/servers") if s["name"] == master_target)
    return {str(v.get("name") or v["path"]): v for v in server["stats"].get("retention_volumes", [])}


# ---- components made to stop talking (SIGSTOP: their heartbeat goes stale) ----------------------


def _agent_pid(env: Env) -> int:
    return int((runtime.run_dir(env.lab_dir, "cloud", "web1") / "export.pid").read_text().split()[0])


def _freeze(pid: Callable[[Env], int], name: str) -> Step:
    def apply(env: Env) -> None:
        os.kill(pid(env), signal.SIGSTOP)
        wait_until(f"{name} counts as disconnected", lambda: not env.connected(name))

    return apply


def _thaw(pid: Callable[[Env], int], name: str) -> Step:
    def revert(env: Env) -> None:
        os.kill(pid(env), signal.SIGCONT)
        wait_until(f"{name} is connected again", lambda: env.connected(name))

    return revert


def _proc(name: str) -> Callable[[Env], int]:
    return lambda env: env.procs[name].pid


# ---- lab edits -------------------------------------------------------------------------------


def _set(kind: str, name: str, *assignments: str, site: str = "onprem") -> Step:
    return lambda env: lab_set(env, kind, name, *assignments, site=site)


def _steps(*steps: Step) -> Step:
    def run(env: Env) -> None:
        for step in steps:
            step(env)

    return run


def _mt_disk_count(env: Env) -> int:
    m = env.fabric("onprem").discover().machine("mt-linux")
    assert m is not None
    return len(m.disks)


_FILLERS: list[str] = []


def _fill_mt(env: Env) -> None:
    """MT-3: give mt-linux disks until it holds 60, so web1's one disk would be the 61st."""
    _FILLERS[:] = [f"fill{i}:1M" for i in range(60 - _mt_disk_count(env))]
    lab_set(env, "machine", "mt-linux", "disk+=" + ",".join(_FILLERS))


def _unfill_mt(env: Env) -> None:
    if _FILLERS:
        lab_set(env, "machine", "mt-linux", "disk-=" + ",".join(f.split(":")[0] for f in _FILLERS))


_WEB1_UUID: list[str] = []


def _clash_uuid(env: Env) -> None:
    m = env.fabric("onprem").discover().machine("web1")
    assert m is not None
    _WEB1_UUID[:] = [m.disks[0].uuid]
    lab_set(env, "disk", "web1/disk0", "uuid=@mt-linux/disk0")


def _restore_uuid(env: Env) -> None:
    if _WEB1_UUID:
        lab_set(env, "disk", "web1/disk0", f"uuid={_WEB1_UUID[0]}")


def _late_agent(env: Env) -> None:
    """AG-1: the failed-over machine reboots and its agent takes 15 minutes to register."""
    lab_set(env, "site", "cloud", "agent_registration_delay=900")
    cloud = env.fabric("cloud")
    cloud.power_off("web1")
    cloud.power_on("web1")


def _prompt_agent(env: Env) -> None:
    lab_set(env, "site", "cloud", f"agent_registration_delay={env.registration_delay}")
    cloud = env.fabric("cloud")
    cloud.power_off("web1")
    cloud.power_on("web1")
    Cycle(env, "web1").wait_agent("cloud")


def _onprem_volume(env: Env) -> str:
    return str(env.root / "retention" / "onprem")


def _lock_volume(locked: bool) -> Step:
    """RP-RET: lock (or unlock) mt-linux's retention volume and ask the master target to look again."""

    def run(env: Env) -> None:
        lock = env.root / "retention" / "onprem" / LOCK_FILE
        if locked:
            lock.touch()
        else:
            lock.unlink(missing_ok=True)
        env.api.post("/api/servers/mt-linux/refresh")
        # `is`, not `is not`: right after a restart a master target reports no volume at all.
        wait_until(
            f"mt-linux reports its retention volume {'in' if locked else ''}eligible",
            lambda: volumes(env, "mt-linux").get(_onprem_volume(env), {}).get("eligible") is (not locked),
        )

    return run


def _windows_mt(env: Env) -> dict[str, str]:
    return {"master_target": "mt-windows", "retention_volume": str(env.root / "retention" / "onprem-windows")}


@dataclass(frozen=True)
class Case:
    expected: tuple[str, ...]
    apply: Step = _nothing
    revert: Step = _nothing
    request: Callable[[Env], Mapping[str, str]] = field(default=lambda env: {})
    machine: str = "web1"
    status: int = 409
    mentions: tuple[str, ...] = ()  # words the first problem's message must contain


CASES = [
    pytest.param(
        Case(("cs-unknown-machine",), machine="web9", status=404, mentions=("web9",)), id="cs-unknown-machine"
    ),
    pytest.param(
        Case(
            ("cs-unreachable",),
            _freeze(_proc("mt-linux"), "mt-linux"),
            _thaw(_proc("mt-linux"), "mt-linux"),
            mentions=("mt-linux",),
        ),
        id="cs-unreachable",
    ),
    pytest.param(
        Case(("mt-os-mismatch",), request=_windows_mt, mentions=("mt-windows", "web1")), id="mt-os-mismatch"
    ),
    pytest.param(Case(("mt-disk-limit",), _fill_mt, _unfill_mt, mentions=("61",)), id="mt-disk-limit"),
    pytest.param(
        Case(("agent-not-registered",), _late_agent, _prompt_agent, mentions=("web1",)),
        id="agent-not-registered",
    ),
    pytest.param(
        Case(("disk-uuid-clash",), _clash_uuid, _restore_uuid, mentions=("web1", "mt-linux")),
        id="disk-uuid-clash",
    ),
    pytest.param(
        Case(
            ("vcenter-not-discovered",),
            _set("site", "onprem", "reachable=false"),
            _set("site", "onprem", "reachable=true"),
            mentions=("onprem",),
        ),
        id="vcenter-not-discovered",
    ),
    pytest.param(
        Case(
            ("mt-not-discovered",),
            _set("machine", "mt-linux", "visible=false"),
            _set("machine", "mt-linux", "visible=true"),
            mentions=("mt-linux",),
        ),
        id="mt-not-discovered",
    ),
    pytest.param(
        Case(
            ("mt-not-discovered",),
            request=lambda env: {"master_target": "mt-nowhere"},
            mentions=("mt-nowhere",),
        ),
        id="mt-not-discovered/unregistered",
    ),
    # A read-only account sees no datastore and, by the same token, lacks the privileges.
    pytest.param(
        Case(
            ("datastores-not-visible", "vcenter-insufficient-privileges"),
            _set("account", "readonly"),
            _set("account", "full"),
            mentions=("esx1",),
        ),
        id="datastores-not-visible",
    ),
    pytest.param(
        Case(
            ("vcenter-insufficient-privileges",),
            _set("account", "full", "privileges-=VirtualMachine.Config.AddExistingDisk"),
            _set("account", "full"),
            mentions=("VirtualMachine.Config.AddExistingDisk",),
        ),
        id="vcenter-insufficient-privileges",
    ),
    pytest.param(
        Case(
            ("source-unreachable",),
            _freeze(_agent_pid, "cloud/web1"),
            _thaw(_agent_pid, "cloud/web1"),
            mentions=("web1",),
        ),
        id="source-unreachable",
    ),
    pytest.param(
        Case(
            ("ps-disconnected",),
            _freeze(_proc("ps-cloud"), "ps-cloud"),
            _thaw(_proc("ps-cloud"), "ps-cloud"),
            mentions=("ps-cloud",),
        ),
        id="ps-disconnected",
    ),
    pytest.param(
        Case(
            ("ps-disconnected",),
            request=lambda env: {"process_server": "ps-nowhere"},
            mentions=("ps-nowhere",),
        ),
        id="ps-disconnected/unregistered",
    ),
    pytest.param(
        Case(
            ("mt-has-snapshots",),
            _set("machine", "mt-linux", "snapshot+=s1"),
            _set("machine", "mt-linux", "snapshot-=s1"),
            mentions=("s1",),
        ),
        id="mt-has-snapshots",
    ),
    pytest.param(
        Case(
            ("mt-on-lvm",), _set("machine", "mt-linux", "lvm=true"), _set("machine", "mt-linux", "lvm=false")
        ),
        id="mt-on-lvm",
    ),
    pytest.param(
        Case(
            ("datastore-not-writable",),
            _set("datastore", "ds-vmfs1", "rw@esx1=false"),
            _set("datastore", "ds-vmfs1", "rw@esx1=true"),
            mentions=("ds-vmfs1", "esx1"),
        ),
        id="datastore-not-writable",
    ),
    pytest.param(
        Case(
            ("retention-volume-ineligible",),
            request=lambda env: {"retention_volume": "/mnt/not-a-volume"},
            mentions=("/mnt/not-a-volume", "not a volume"),
        ),
        id="retention-volume-ineligible",
    ),
    pytest.param(
        Case(
            ("retention-volume-ineligible",),
            _lock_volume(True),
            _lock_volume(False),
            request=lambda env: {"retention_volume": _onprem_volume(env)},
            mentions=("not eligible", "lock"),
        ),
        id="retention-volume-ineligible/locked",
    ),
    pytest.param(
        Case(
            ("mt-tools-missing",),
            _set("machine", "mt-linux", "tools=false"),
            _set("machine", "mt-linux", "tools=true"),
        ),
        id="mt-tools-missing",
    ),
    pytest.param(
        Case(
            ("mt-enableuuid-missing",),
            _set("machine", "mt-linux", "enableuuid=false"),
            _set("machine", "mt-linux", "enableuuid=true"),
        ),
        id="mt-enableuuid-missing",
    ),
    pytest.param(
        Case(
            ("mt-host-no-vmfs",),
            _set("datastore", "ds-vmfs1", "type=nfs"),
            _set("datastore", "ds-vmfs1", "type=vmfs"),
            mentions=("esx1",),
        ),
        id="mt-host-no-vmfs",
    ),
    pytest.param(
        Case(
            ("mt-paravirtual-controller",),
            _set("machine", "mt-linux", "scsi=pvscsi"),
            _set("machine", "mt-linux", "scsi=lsilogic"),
        ),
        id="mt-paravirtual-controller",
    ),
    pytest.param(
        Case(
            ("host-free-edition",),
            _set("host", "esx1", "licence=free"),
            _set("host", "esx1", "licence=enterprise"),
            mentions=("esx1",),
        ),
        id="host-free-edition",
    ),
    pytest.param(
        Case(
            ("not-failback-eligible",),
            _set("machine", "web1", "origin=migration", site="cloud"),
            _set("machine", "web1", "origin=failover", site="cloud"),
            mentions=("migrated",),
        ),
        id="not-failback-eligible/migrated",
    ),
    pytest.param(
        Case(
            ("not-failback-eligible",),
            _set("machine", "web1", "origin=manual", site="cloud"),
            _set("machine", "web1", "origin=failover", site="cloud"),
            mentions=("created in the cloud",),
        ),
        id="not-failback-eligible/created-in-cloud",
    ),
    pytest.param(
        Case(
            ("not-failback-eligible",),
            _steps(
                _set("site", "cloud", "resource_group+=rg-other"),
                _set("machine", "web1", "resource_group=rg-other", site="cloud"),
            ),
            _set("machine", "web1", "resource_group=rg-recovery", site="cloud"),
            mentions=("rg-other",),
        ),
        id="not-failback-eligible/moved-resource-group",
    ),
    # Discovery no longer lists the cloud VM: what the configuration server sees once it is
    # deleted (a real deletion of web1 would end the module's cycle; see test_disabled_item).
    pytest.param(
        Case(
            ("not-failback-eligible",),
            _set("machine", "web1", "visible=false", site="cloud"),
            _set("machine", "web1", "visible=true", site="cloud"),
            mentions=("deleted",),
        ),
        id="not-failback-eligible/cloud-vm-deleted",
    ),
    pytest.param(
        Case(
            ("target-not-esxi",),
            _set("host", "esx1", "kind=hyperv"),
            _set("host", "esx1", "kind=esxi"),
            mentions=("esx1",),
        ),
        id="target-not-esxi",
    ),
    pytest.param(
        Case(("datastore-required",), request=lambda env: {"datastore": ""}), id="datastore-required"
    ),
    # The on-premises machine is gone (discovery no longer lists it): a new one would be created in
    # the datastore given, which must be mounted read/write on the master target's host.
    pytest.param(
        Case(
            ("datastore-required",),
            _set("machine", "web1", "visible=false"),
            _set("machine", "web1", "visible=true"),
            request=lambda env: {"datastore": "ds-nowhere"},
            mentions=("ds-nowhere",),
        ),
        id="datastore-required/new-machine",
    ),
]


@pytest.fixture(scope="module")
def deployment(dr_env: Environment) -> Iterator[Environment]:
    """web1 failed over and committed; a Windows master target registered on-premises too."""
    env = dr_env
    fail_over_and_commit(env, "web1")
    windows_volume = env.root / "retention" / "onprem-windows"
    windows_volume.mkdir(parents=True, exist_ok=True)
    env.start_component(
        "master-target", "mt-windows", "onprem", "--os", "windows", "--retention-volume", str(windows_volume)
    )
    yield env


def test_baseline_is_clean(deployment: Environment) -> None:
    out = readiness(deployment, "web1")
    assert out["problems"] == [] and out["ready"] is True


def test_fabrics_show_a_readable_summary_and_remove_only_unused_sites(deployment: Environment) -> None:
    env = deployment
    cli_env = {**env.cli_env, "COLUMNS": "200"}
    listed = run_cli("fabrics", "list", env=cli_env).stdout
    assert "2 hosts, 2 datastores" in listed and '{"hosts"' not in listed  # was the summary's JSON
    # web1 (failed over and committed) lives on both sites: removing one would strand it.
    refused = run_cli("fabrics", "remove", "onprem", env=cli_env, check=False)
    assert refused.returncode == 2 and "fabric-in-use" in refused.stderr and "web1" in refused.stderr
    env.api.post(
        "/api/fabrics",
        {"name": "spare", "kind": "lab", "site": "onprem", "connection": {"path": str(env.lab_dir)}},
    )
    assert "fabric spare removed" in run_cli("fabrics", "remove", "spare", env=cli_env).stdout
    gone = run_cli("fabrics", "show", "spare", env=cli_env, check=False)
    assert gone.returncode == 2 and "not-found" in gone.stderr
    assert "fabric-removed" in {e["code"] for e in env.api.get("/api/events")}


@pytest.mark.parametrize("case", CASES)
def test_rule_refuses_before_anything_changes(deployment: Environment, case: Case) -> None:
    env = deployment
    try:
        case.apply(env)
        request = dict(case.request(env))
        codes = what_if(env, case.machine, **request)
        assert codes == list(case.expected)
        before = world(env)
        with pytest.raises(ApiError) as refused:
            env.api.post(f"/api/replicatedItems/{case.machine}/reprotect", body(env, **request))
        assert refused.value.status == case.status
        problems = refused.value.problems
        assert [p["code"] for p in problems] == codes
        assert all(p["message"] and p["remediation"] for p in problems)
        for word in case.mentions:
            assert word in problems[0]["message"], (problems[0], volumes(env, "mt-linux"))
        assert world(env) == before
    finally:
        case.revert(env)
    assert what_if(env, "web1") == []


def test_vm_snapshots_do_not_block(deployment: Environment) -> None:
    """RP-VM-SNAP: a snapshot on the on-premises machine is no blocker; reprotect says it will merge it."""
    env = deployment
    lab_set(env, "machine", "web1", "snapshot+=s1")
    try:
        out = readiness(env, "web1")
        assert out["problems"] == [] and out["ready"] is True
        notes = [n for n in out["notes"] if n["rule"] == "RP-VM-SNAP"]
        assert len(notes) == 1 and "merge" in notes[0]["message"].lower(), out["notes"]
    finally:
        lab_set(env, "machine", "web1", "snapshot-=s1")


# Five rules from five places: the lab's master target VM, its host, a disk, and two request values.
FIVE = (
    "disk-uuid-clash",
    "ps-disconnected",
    "retention-volume-ineligible",
    "mt-paravirtual-controller",
    "host-free-edition",
)


def test_what_if_lists_five_failing_rules_at_once(deployment: Environment) -> None:
    env = deployment
    request = {"process_server": "ps-nowhere", "retention_volume": "/mnt/not-a-volume"}
    _clash_uuid(env)
    try:
        lab_set(env, "machine", "mt-linux", "scsi=pvscsi")
        lab_set(env, "host", "esx1", "licence=free")
        assert what_if(env, "web1", **request) == list(FIVE)
        before = world(env)
        with pytest.raises(ApiError) as refused:
            env.api.post("/api/replicatedItems/web1/reprotect", body(env, **request))
        assert refused.value.status == 409
        assert [p["code"] for p in refused.value.problems] == list(FIVE)
        assert world(env) == before
    finally:
        _restore_uuid(env)
        lab_set(env, "machine", "mt-linux", "scsi=lsilogic")
        lab_set(env, "host", "esx1", "licence=enterprise")
    assert what_if(env, "web1") == []


# ---- replication groups and recovery plans ---------------------------------------------------


def _create_plan(env: Env, name: str, items: list[str]) -> None:
    env.api.post("/api/recoveryPlans", {"name": name, "groups": [{"items": items}]})


@pytest.fixture(scope="module")
def group_g1(deployment: Environment) -> Environment:
    """app1 and db1 (both Linux) in replication group g1, failed over and committed through plan p-g1."""
    env = deployment
    protect(env, "app1", group="g1")
    protect(env, "db1", group="g1")
    _create_plan(env, "p-g1", ["app1", "db1"])
    assert run_job(env, "/api/recoveryPlans/p-g1/failover", {"planned": True})["state"] == "succeeded"
    assert run_job(env, "/api/recoveryPlans/p-g1/commit", {})["state"] == "succeeded"
    for machine in ("app1", "db1"):
        Cycle(env, machine).wait_agent("cloud")
    return env


def _values(env: Env, **mts: str) -> dict[str, dict[str, str]]:
    return {
        machine: body(env, master_target=mt) if mt == "mt-linux" else body(env, **_windows_mt(env))
        for machine, mt in mts.items()
    }


def _plan_reprotect_refused(env: Env, plan: str, values: dict[str, dict[str, str]], code: str) -> None:
    """The plan's job starts; its first task (the first machine's prerequisite check) refuses with
    `code`, and no later task ran: nothing was powered off, merged, attached or replicated.

    A failed task keeps only its first problem ((store/jobs.py)), so each plan case breaks one rule.
    """
    before = world(env)
    job = run_job(env, f"/api/recoveryPlans/{plan}/reprotect", {"items": values})
    assert job["state"] == "failed", job
    first, rest = job["tasks"][0], job["tasks"][1:]
    assert first["action"] == "reprotect-check" and first["state"] == "failed", first
    assert first["error"]["code"] == code and job["error"]["code"] == code, (first, job["error"])
    assert first["error"]["remediation"], first
    assert rest and all(t["state"] == "skipped" and t["started_at"] is None for t in rest), rest
    jobs, machines = world(env)
    assert machines == before[1] and set(jobs) == set(before[0]) | {job["id"]}


def test_group_needs_recovery_plan(group_g1: Environment) -> None:
    env = group_g1
    assert what_if(env, "app1") == ["group-needs-recovery-plan"]
    before = world(env)
    with pytest.raises(ApiError) as refused:
        env.api.post("/api/replicatedItems/app1/reprotect", body(env))
    assert refused.value.status == 409
    assert [p["code"] for p in refused.value.problems] == ["group-needs-recovery-plan"]
    assert "g1" in refused.value.problems[0]["message"]
    assert world(env) == before


def test_group_mixed_mt(group_g1: Environment) -> None:
    """RP-GROUP-MT: the plan gives db1 another master target than app1."""
    env = group_g1
    _plan_reprotect_refused(env, "p-g1", _values(env, app1="mt-linux", db1="mt-windows"), "group-mixed-mt")


@pytest.fixture(scope="module")
def win1_in_g1(group_g1: Environment) -> Environment:
    """win1 joins g1 (so the group mixes OS types), protected as a physical Windows Server 2008 R2
    SP1 server (RP-W2K8), failed over and committed."""
    env = group_g1
    lab_set(env, "machine", "win1", "physical=true", f"os_version={W2K8}")
    protect(env, "win1", group="g1")
    assert run_job(env, "/api/replicatedItems/win1/failover", {"planned": True})["state"] == "succeeded"
    assert run_job(env, "/api/replicatedItems/win1/commit", {})["state"] == "succeeded"
    Cycle(env, "win1").wait_agent("cloud")
    _create_plan(env, "p-g1-all", ["app1", "db1", "win1"])
    return env


def test_group_mixed_os(win1_in_g1: Environment) -> None:
    """RP-GROUP-OS: every machine is given mt-linux, but win1 runs Windows."""
    env = win1_in_g1
    values = _values(env, app1="mt-linux", db1="mt-linux", win1="mt-linux")
    _plan_reprotect_refused(env, "p-g1-all", values, "group-mixed-os")


def test_os_not_failback_capable(win1_in_g1: Environment) -> None:
    """RP-W2K8. win1 is also a member of the mixed group g1 (the lab has one Windows machine),
    reprotected on its own: those two group rules are listed with it."""
    env = win1_in_g1
    expected = ["group-mixed-os", "group-needs-recovery-plan", "os-not-failback-capable"]
    assert what_if(env, "win1", **_windows_mt(env)) == expected
    before = world(env)
    with pytest.raises(ApiError) as refused:
        env.api.post("/api/replicatedItems/win1/reprotect", body(env, **_windows_mt(env)))
    assert [p["code"] for p in refused.value.problems] == expected
    assert W2K8 in refused.value.problems[-1]["message"]
    assert world(env) == before


def test_disabled_item_is_not_failback_eligible(win1_in_g1: Environment) -> None:
    """RP-ELIGIBLE, protection disabled (win1 is the module's last use of it)."""
    env = win1_in_g1
    assert run_job(env, "/api/replicatedItems/win1/disable", {})["state"] == "succeeded"
    codes = what_if(env, "win1", **_windows_mt(env))
    assert codes == [
        "group-mixed-os",
        "group-needs-recovery-plan",
        "os-not-failback-capable",
        "not-failback-eligible",
    ]
    out = readiness(env, "win1", **_windows_mt(env))
    assert "disabled" in out["problems"][-1]["message"]


# ---- failback: the master target's disks moved after reprotect (RP-MT-MOVE) -----------------------


def test_mt_disks_moved(deployment: Environment) -> None:
    """Reprotect web1 for real (merging the snapshot of the on-premises machine, RP-VM-SNAP), then
    storage-migrate the master target: failback refuses with mt-disks-moved before it detaches."""
    env = deployment
    lab_set(env, "machine", "web1", "snapshot+=s1")
    job = run_job(env, "/api/replicatedItems/web1/reprotect", body(env))
    assert job["state"] == "succeeded", [
        (t["action"], t["state"], t["error"], t["message"]) for t in job["tasks"]
    ]
    merge = next(t for t in job["tasks"] if t["action"] == "merge-snapshots")
    assert job["result"][str(merge["ordinal"])]["merged"] == 1
    onprem = env.fabric("onprem").discover()
    web1, mt = onprem.machine("web1"), onprem.machine("mt-linux")
    assert web1 is not None and mt is not None and web1.snapshots == ()
    assert {d.uuid for d in web1.disks} <= {d.uuid for d in mt.disks}  # attached to the master target

    def failback_what_if() -> list[str]:
        out = env.api.post("/api/replicatedItems/web1/failback", {"what_if": True})
        return [p["code"] for p in out["problems"]]

    assert failback_what_if() == []
    # `lab move DIR mt-linux ds-nfs1`: the lab administrator's Storage vMotion, not the product's account.
    LabFabric(env.lab_dir, "onprem", enforce_privileges=False).move_storage("mt-linux", "ds-nfs1")
    assert failback_what_if() == ["mt-disks-moved"]
    before = world(env)
    with pytest.raises(ApiError) as refused:
        env.api.post("/api/replicatedItems/web1/failback", {})
    assert refused.value.status == 409
    problem = refused.value.problems[0]
    assert [p["code"] for p in refused.value.problems] == ["mt-disks-moved"]
    assert "ds-nfs1" in problem["message"] and "attach them to web1" in problem["remediation"]
    assert world(env) == before
