"""The VM guest's oracle pieces that need no QEMU: the host-side check of dumped log files, the
console parser that turns the guest's reports into a verdict, which guest a machine runs, and the
lab CLI's checks of VM settings."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

from siterecovery.fabrics.lab_build import default_state
from siterecovery.fabrics.lab_model import CLOUD, ONPREM, GuestKind, LabMachine
from siterecovery.lab.guest import GuestState, read_status
from siterecovery.lab.vm.fs_oracle import check_files
from siterecovery.lab.vm.guest import Console

from .conftest import Lab


def _put(folder: Path, seq: int, kind: str = "d", machine: str = "web1", tamper: bool = False) -> Path:
    data = f"SRFILE {machine} {seq} {kind}\n".encode() + hashlib.sha256(str(seq).encode()).digest() * 64
    path = folder / f"{seq}.{kind}.{hashlib.sha256(data).hexdigest()}"
    path.write_bytes(data[:100] if tamper else data)
    return path


def test_a_prefix_of_whole_files_with_one_torn_file_after_it_passes(tmp_path: Path) -> None:
    for seq in range(1, 6):
        _put(tmp_path, seq, "q" if seq == 3 else "d")
    _put(tmp_path, 6, tamper=True)  # the write in flight when the machine died
    verdict = check_files(tmp_path, "web1")
    assert verdict.ok and verdict.records == 5 and verdict.torn_tail, verdict
    assert verdict.quiesce_markers == (3,)


def test_a_file_after_a_gap_or_a_foreign_file_fails(tmp_path: Path) -> None:
    for seq in (1, 2, 4):
        _put(tmp_path, seq)
    verdict = check_files(tmp_path, "web1")
    assert not verdict.ok and verdict.records == 2 and verdict.first_bad == 3, verdict
    for path in tmp_path.glob("4.*"):
        path.unlink()
    _put(tmp_path, 3, machine="db1")  # whole, but another machine's
    assert check_files(tmp_path, "web1").records == 2
    _put(tmp_path, 1, tamper=True)  # a second, torn copy of a file inside the prefix
    assert not check_files(tmp_path, "web1").ok


def test_console_reports_become_the_start_verdict(tmp_path: Path) -> None:
    status = tmp_path / "guest.json"
    console = Console("web1", status, io.BytesIO())
    for line in (
        "SR BOOT 1.9",
        "SR PREFSCK rc=0 recovery=1",
        "[    2.1] random kernel noise",
        "SR FSCK rc=4",
        "SR fsck: Inode 12 has an invalid extent",
        "SR VERDICT ok=1 records=40 torn=0 first_bad=41 files=40 quiesce=7,20 reason=clean",
    ):
        console.line(line)
    got = read_status(status)
    assert got is not None
    verdict = got.start_verdict
    assert verdict["ok"] is False and "invalid extent" in str(verdict["reason"])  # the file system's own
    assert verdict["quiesce_markers"] == [7, 20] and got.flushed == 40
    assert verdict["filesystem"] == {
        "fsck_before_replay_rc": 0,
        "needed_journal_replay": True,
        "clean_without_replay": False,
        "fsck_rc": 4,
    }
    console.command("freeze")  # typed before the guest listens: kept until it does
    assert console.send.getvalue() == b""  # type: ignore[attr-defined]
    console.line("SR LISTENING")
    assert console.send.getvalue() == b"freeze\n"  # type: ignore[attr-defined]
    console.line("SR QUIESCED 41")
    got = read_status(status)
    assert got is not None and got.state is GuestState.QUIESCED and got.quiesce_seq == 41


def test_a_failed_over_copy_runs_the_guest_of_the_machine_whose_log_it_continues() -> None:
    state = default_state(64 << 20)
    web1 = state.sites[ONPREM].find_machine("web1")
    assert web1 is not None and state.guest_of(web1) is GuestKind.PYTHON
    web1.guest = GuestKind.VM
    copy = LabMachine(id="vm-1", name="web1", bios_uuid="x", os_type=web1.os_type)
    test_copy = LabMachine(id="vm-2", name="web1-test", bios_uuid="y", os_type=web1.os_type, log_owner="web1")
    state.sites[CLOUD].machines += [copy, test_copy]
    assert state.guest_of(copy) is GuestKind.VM and state.guest_of(test_copy) is GuestKind.VM
    state.guest = GuestKind.VM
    db1 = state.sites[ONPREM].find_machine("db1")
    assert db1 is not None and state.guest_of(db1) is GuestKind.VM


def test_a_vm_lab_needs_disks_for_ext4_and_guest_values_are_checked(tmp_path: Path) -> None:
    lab = Lab(tmp_path / "lab")
    small = lab.cli("create", str(lab.path), "--guest", "vm", "--disk-size", "16M", check=False)
    assert small.returncode == 1 and "disk-too-small" in small.stderr
    lab.cli("create", str(lab.path), "--disk-size", "64M")
    bad = lab.cli("set", str(lab.path), "machine", "web1", "guest=xen", check=False)
    assert bad.returncode == 2 and "python, vm" in bad.stderr
