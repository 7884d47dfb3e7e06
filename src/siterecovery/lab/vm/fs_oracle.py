"""The VM guest's oracle run from the host: is an ext4 disk image clean, and does it hold a clean
prefix of the guest's numbered, checksummed log files?

The same checks the guest makes at boot (init.sh), for a disk no guest runs on: a replica, a
materialised recovery point, a powered-off machine's disk. `replay=True` does what a reboot does
first (the journal is replayed, on a sparse copy so the image itself is untouched); `replay=False`
checks the image exactly as it is, which an app-consistent point (taken under `fsfreeze`) must
pass. Files are read with `debugfs rdump`, so nothing is mounted and no root is needed.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from siterecovery.fabrics.base import FabricError
from siterecovery.lab.oracle import OracleVerdict

_NAME = re.compile(r"^(\d+)\.([dq])\.([0-9a-f]{64})$")
_TIMEOUT = 300.0


@dataclass(frozen=True)
class FsCheck:
    needed_replay: bool  # the journal held transactions not yet written home (a crash-consistent image)
    fsck_rc: int  # e2fsck -fn's exit status after the replay (when asked for), 0 = clean
    findings: str  # e2fsck's output when it is not clean

    @property
    def clean(self) -> bool:
        return self.fsck_rc == 0


def _tool(name: str) -> str:
    candidates = (f"/sbin/{name}", f"/usr/sbin/{name}")
    path = shutil.which(name) or next((p for p in candidates if Path(p).exists()), "")
    if not path:
        raise FabricError(
            "vm-guest-unavailable",
            f"{name} is not installed, so an ext4 disk cannot be checked.",
            "Install e2fsprogs (`make system-deps`).",
        )
    return path


def _run(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=_TIMEOUT)


def needs_recovery(image: Path) -> bool:
    out = _run(_tool("dumpe2fs"), "-h", str(image)).stdout
    features = next((line for line in out.splitlines() if line.startswith("Filesystem features:")), "")
    return "needs_recovery" in features.split()


def check_files(folder: Path, machine: str | None) -> OracleVerdict:
    """The log files in `folder` (a dumped `/log`): 1..n whole, one torn or missing after, nothing beyond."""
    good: dict[int, str] = {}
    bad: set[int] = set()
    owner = machine
    for path in folder.iterdir() if folder.is_dir() else ():
        match = _NAME.match(path.name)
        if match is None:
            bad.add(-1)
            continue
        seq, kind, digest = int(match[1]), match[2], match[3]
        data = path.read_bytes()
        header = data.split(b"\n", 1)[0].decode(errors="replace").split()
        whole = hashlib.sha256(data).hexdigest() == digest
        if whole and len(header) == 4 and header[0] == "SRFILE" and header[2:] == [str(seq), kind]:
            if owner is None:
                owner = header[1]
            if header[1] == owner and seq not in good:
                good[seq] = kind
                continue
        bad.add(seq)
    records = 0
    while records + 1 in good:
        records += 1
    beyond = sorted(s for s in (*good, *bad) if s > records + 1 or (s <= records and s in bad) or s < 0)
    markers = tuple(s for s in range(1, records + 1) if good[s] == "q")
    torn = records + 1 in bad
    if beyond:
        return OracleVerdict(
            False, records, records + 1,
            f"file {beyond[0]} is present after a clean prefix of {records} files (writes lost or reordered)",
            machine=owner or "", quiesce_markers=markers,
        )  # fmt: skip
    reason = f"clean prefix of {records} files" + (f"; file {records + 1} torn" if torn else "")
    return OracleVerdict(True, records, None, reason, owner or "", markers, torn)


def verify_fs_image(
    image: Path, machine: str | None = None, *, replay: bool = True
) -> tuple[OracleVerdict, FsCheck]:
    """Check an ext4 image from the host (see the module's docstring); the image is not modified."""
    with tempfile.TemporaryDirectory(prefix="sr-fs-oracle-") as tmp:
        work = Path(tmp)
        needed = needs_recovery(image)
        target = image
        if replay and needed:
            target = work / "replayed.img"
            subprocess.run(["cp", "--sparse=always", str(image), str(target)], check=True, timeout=_TIMEOUT)
            replayed = _run(_tool("e2fsck"), "-p", "-E", "journal_only", str(target))
            if replayed.returncode not in (0, 1):
                fs = FsCheck(needed, replayed.returncode, (replayed.stdout + replayed.stderr)[-800:])
                return OracleVerdict(False, 0, 1, f"journal replay failed: {fs.findings}"), fs
        fsck = _run(_tool("e2fsck"), "-fn", str(target))
        findings = "" if fsck.returncode == 0 else (fsck.stdout + fsck.stderr)[-800:]
        fs = FsCheck(needed, fsck.returncode, findings)
        dump = work / "dump"
        dump.mkdir()
        _run(_tool("debugfs"), "-R", f"rdump /log {dump}", str(target))
        files = check_files(dump / "log", machine)
    if not fs.clean:
        reason = f"e2fsck -fn exit {fs.fsck_rc}: {fs.findings}"
        return OracleVerdict(False, files.records, files.records + 1, reason, files.machine), fs
    return files, fs
