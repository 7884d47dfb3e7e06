"""kill -9 of every component under a real Linux VM guest: its file system and fsync'd files survive.

The suite's one VM scenario (docs/faults.md). A lab machine becomes a QEMU VM (lab/vm) whose
64 MiB virtio disk is its agent's NBD export; the guest keeps numbered, checksummed files on ext4,
each written with `dd conv=fsync` plus a directory fsync and then reported `FLUSHED n` on its
console. While it writes, a short seeded schedule kills the agent, the process server, the master
target and the configuration server (each once) and restarts them as an operator would; QEMU
rides out the agent's restart by reconnecting to its export. Then a planned failover: the guest
shuts down cleanly, the recovered VM boots and its own oracle (e2fsck -fn, then every file
checked) must pass with every file flushed before the shutdown present. Some of the crash points
listed before the failover, materialised as a test failover would, are checked from the host
(journal replayed on a copy, e2fsck -fn, the files a clean prefix).

Kept short for CI under TCG on 2 shared cores: four kills, each after a few more files, two points.
"""

from __future__ import annotations

import random
import time
from pathlib import Path

import pytest

from siterecovery.demo.cycle import Cycle
from siterecovery.demo.environment import Environment
from siterecovery.lab import runtime
from siterecovery.lab.vm.fs_oracle import verify_fs_image
from tests.conftest import require_tool
from tests.e2e.conftest import protect, run_job, task_result
from tests.faults.checks import check_points_offline, data_pair, points_summary, wait_listed
from tests.faults.conftest import POLICY, FaultSite
from tests.faults.records import Verdict
from tests.faults.report import Report, Row
from tests.faults.schedule import Component, Injector, make_schedule

pytestmark = pytest.mark.vm

# The one default lab machine no other scenario protects, made a Linux VM with a 64 MiB disk
# (ext4's smallest comfortable size) in place of its own.
MACHINE = "win1"
DISK = "vm0"
KILLS = len(Component)  # each component once
ENABLED_AFTER = 16  # protect() enables replication once the guest has flushed this many files
POINTS = 2  # crash points materialised and checked from the host


def _fs_verdict(image: Path) -> Verdict:
    """The host-side oracle on a materialised point, as a clean-prefix verdict."""
    files, fs = verify_fs_image(image, MACHINE)  # the journal is replayed on a copy
    problem = "" if files.ok and fs.clean else f"{files.reason} (e2fsck -fn exit {fs.fsck_rc})"
    return Verdict(files.records, problem)


def _flushed(env: Environment) -> int:
    """The files the source guest has reported fsync'd (`FLUSHED n` on its console)."""
    status = runtime.guest_status(env.lab_dir, "onprem", MACHINE)
    return status.flushed if status is not None else 0


def test_kills_under_a_vm_guest(fault_site: FaultSite, fault_report: Report, tmp_path: Path) -> None:
    for tool in ("qemu-system-x86_64", "busybox", "e2fsck", "debugfs"):
        require_tool(tool)
    env, seed = fault_site.env, fault_site.options.seed
    linux = ("os=linux", "os_version=Ubuntu 22.04 LTS")
    env.lab_set("machine", MACHINE, *linux, "guest=vm", "disk-=disk0", f"disk+={DISK}:64M")
    started = time.monotonic()
    try:
        protect(env, MACHINE, policy=POLICY)
        cycle, injector = Cycle(env, MACHINE), Injector(env, MACHINE)
        log: list[str] = []
        for kill in make_schedule(KILLS, seed):
            # A VM writes a few files a second under TCG: a few files (1-6) between kills.
            cycle.wait_records("onprem", _flushed(env) + 1 + kill.after_records // 8)
            log.append(f"{kill.component} at file {_flushed(env)}")
            injector.kill_and_restart(kill.component)
        cycle.wait_records("onprem", _flushed(env) + 4)  # the guest writes on after them all
        running = runtime.guest_status(env.lab_dir, "onprem", MACHINE)
        assert running is not None and not running.error, running

        # The crash points are checked before the failover: the recovered VM writes its replica
        # directly (outside the journal), so a point materialised after it booted would mix both.
        crash = [p for p in wait_listed(env, MACHINE) if p["kind"] == "crash"]
        chosen = random.Random(seed).sample(crash, min(POINTS, len(crash)))
        points = check_points_offline(
            env, chosen, data_pair(env, MACHINE, DISK), _fs_verdict, tmp_path / "pts"
        )
        job = run_job(env, f"/api/replicatedItems/{MACHINE}/failover", {"planned": True})
        flushed = _flushed(env)  # as the guest reported it before its clean shutdown
        booted = task_result(job, "start-recovery-machine")["oracle"] if job["state"] == "succeeded" else {}
    finally:
        for site in ("onprem", "cloud"):  # a TCG VM left running would take a core from what follows
            runtime.crash_guest(env.lab_dir, site, MACHINE)
    recovered = int(booted.get("records", 0))
    fault_report.add(
        Row(
            f"VM guest (ext4, fsync'd files): kill -9 of each component (seed {seed}), then planned failover",
            ", ".join(f"{c} x{n}" for c, n in sorted(injector.survived.items())),
            flushed=flushed,
            recovered=recovered,
            points=points_summary(points),
            records_checked=recovered + sum(p.verdict.prefix for p in points if p.verdict),
            seconds=time.monotonic() - started,
        )
    )
    context = f"kills: {log}; booted: {booted}; points: {points}"
    assert job["state"] == "succeeded", f"{job}\n{context}"
    assert all(injector.survived[c] == 1 for c in Component), injector.survived
    fs = booted["filesystem"]
    assert booted["ok"] and fs["fsck_rc"] == 0, context  # e2fsck -fn clean, the files a clean prefix
    assert fs["clean_without_replay"], context  # a planned failover shuts the guest down cleanly
    assert flushed > 0 and recovered >= flushed, f"{flushed - recovered} flushed files lost; {context}"
    assert len(points) == min(POINTS, len(crash)) >= 1, context
    # Replication was enabled once the guest had flushed ENABLED_AFTER files: every point holds them.
    bad = [p for p in points if p.verdict is None or not p.verdict.clean or p.verdict.prefix < ENABLED_AFTER]
    assert not bad, f"crash points that are not clean: {bad}\n{context}"
