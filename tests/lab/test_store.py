"""The inventory file is replaced atomically under a lock: readers never see half a file."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from siterecovery.fabrics.lab_model import LabState
from siterecovery.fabrics.lab_store import LabStore, write_atomically

from .conftest import Lab

_WRITER = """
import sys
from pathlib import Path
from siterecovery.fabrics.lab_settings import SetKind, apply_settings
from siterecovery.fabrics.lab_store import LabStore
store = LabStore(Path(sys.argv[1]))
n = 0
while True:
    n += 1
    with store.edit() as state:
        apply_settings(state, store.lab_dir, "onprem", SetKind.MACHINE, "web1", [f"template=t{n}"])
    if n == 20:
        print("writing", flush=True)
"""


def test_concurrent_writers_and_kill_9_never_leave_half_a_file(lab: Lab) -> None:
    writers = [
        subprocess.Popen([sys.executable, "-c", _WRITER, str(lab.path)], stdout=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    try:
        for w in writers:
            assert w.stdout is not None and w.stdout.readline() == "writing\n"
        store = LabStore(lab.path)
        seen = set()
        for _ in range(200):
            # Read without the lock, as a careless reader would: the rename still makes it whole.
            state = LabState.model_validate_json((lab.path / "inventory.json").read_bytes())
            seen.add(state.sites["onprem"].find_machine("web1").template)  # type: ignore[union-attr]
            store.read()
        assert len(seen) > 1  # the writers really were writing while we read
    finally:
        for w in writers:
            w.send_signal(signal.SIGKILL)
            w.wait()
    assert LabStore(lab.path).read().sites["onprem"].find_machine("web1") is not None
    # A writer killed mid-write leaves at most its own temp file, never a damaged inventory.
    leftovers = [p.name for p in lab.path.iterdir() if p.name.endswith(".tmp")]
    assert all(p.startswith(".inventory.json.") for p in leftovers)


def test_failed_edit_writes_nothing(lab: Lab) -> None:
    store = LabStore(lab.path)
    before = (lab.path / "inventory.json").read_bytes()
    with pytest.raises(RuntimeError), store.edit() as state:
        state.disk_size = 1
        raise RuntimeError("abandon")
    assert (lab.path / "inventory.json").read_bytes() == before


def test_write_atomically_replaces_by_rename(tmp_path: Path) -> None:
    target = tmp_path / "f.json"
    target.write_text("old")
    inode = os.stat(target).st_ino
    write_atomically(target, b"new")
    assert target.read_text() == "new" and os.stat(target).st_ino != inode
    assert [p.name for p in tmp_path.iterdir()] == ["f.json"]
