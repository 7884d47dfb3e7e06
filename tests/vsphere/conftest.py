"""A real vCenter simulator for the vSphere tests: govmomi's vcsim, built once, started once per run.

`vcsim` (session-scoped) builds `tests/vsphere/vcsim/main.go` with the Debian govmomi sources when
the cached binary is missing or older than its source, starts it on a free loopback port, and
stops it at the end. Other test folders can reuse it: `from tests.vsphere.conftest import ...` is
not needed — request the `vcsim` fixture (declared in a conftest they load) and use
`Vcsim.service_instance()` / `Vcsim.fabric()`.
"""

from __future__ import annotations

import json
import os
import ssl
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from pyVim.connect import Disconnect, SmartConnect
from pyVim.task import WaitForTask
from pyVmomi import vim

from siterecovery.fabrics.base import DiskSpec, MachineSpec, OsType
from siterecovery.fabrics.vsphere import VSphereFabric
from tests.conftest import require_tool
from tests.dataplane.conftest import plane  # noqa: F401 - the real data-plane processes (tests/dataplane's fixture)

VCSIM_DIR = Path(__file__).resolve().parent / "vcsim"
VCSIM_BIN = VCSIM_DIR / "vcsim"
GOPATH = "/usr/share/gocode"


@dataclass(frozen=True)
class Vcsim:
    """A running simulator: where it listens, its accounts, and the licence keys it knows by edition."""

    host: str
    port: int
    url: str
    users: dict[str, dict[str, str]]
    licences: dict[str, str]

    def password(self, user: str) -> str:
        return self.users[user]["password"]

    def service_instance(self, user: str = "admin") -> Any:
        """A pyVmomi ServiceInstance logged in as `user` (disconnect it when done)."""
        return SmartConnect(
            host=self.host,
            port=self.port,
            user=user,
            pwd=self.password(user),
            sslContext=ssl._create_unverified_context(),
        )

    def fabric(self, user: str = "admin", **kwargs: Any) -> VSphereFabric:
        return VSphereFabric(self.host, self.port, user, self.password(user), insecure=True, **kwargs)


def build_vcsim() -> Path:
    go = require_tool("go")
    source = VCSIM_DIR / "main.go"
    if VCSIM_BIN.exists() and VCSIM_BIN.stat().st_mtime >= source.stat().st_mtime:
        return VCSIM_BIN
    env = {**os.environ, "GO111MODULE": "off", "GOPATH": GOPATH}
    proc = subprocess.run(
        [go, "build", "-o", str(VCSIM_BIN), "."],
        cwd=VCSIM_DIR,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if proc.returncode != 0:
        pytest.fail(f"building vcsim failed (needs golang-github-vmware-govmomi-dev):\n{proc.stderr}")
    return VCSIM_BIN


@pytest.fixture(scope="session")
def vcsim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Vcsim]:
    binary = build_vcsim()
    # Its log goes to a file: a pipe nobody reads would fill up and freeze the simulator.
    log_path = tmp_path_factory.mktemp("vcsim") / "vcsim.log"
    log = open(log_path, "w")  # noqa: SIM115 - closed after the process below
    proc = subprocess.Popen(
        [str(binary), "-listen", "127.0.0.1:0"], stdout=subprocess.PIPE, stderr=log, text=True
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line:
            pytest.fail(f"vcsim did not start: {log_path.read_text()[-2000:]}")
        info = json.loads(line)
        yield Vcsim(
            host=info["host"],
            port=info["port"],
            url=info["url"],
            users=info["users"],
            licences=info["licences"],
        )
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def find(si: Any, kind: Any, name: str) -> Any:
    """The managed object of type `kind` named `name`, through a pyVmomi ServiceInstance."""
    view = si.content.viewManager.CreateContainerView(si.content.rootFolder, [kind], True)
    try:
        return next(o for o in view.view if o.name == name)
    finally:
        view.Destroy()


@contextmanager
def nas_datastore(
    si: Any, host: str, export: Path, access: str = "readWrite", kind: str = "NFS"
) -> Iterator[Any]:
    """A NAS datastore on `host` named after `export` (a folder it creates); destroyed afterwards."""
    host_system = find(si, vim.HostSystem, host)
    export.mkdir()
    spec = vim.host.NasVolume.Specification(
        remoteHost="127.0.0.1", remotePath=str(export), localPath=str(export), accessMode=access, type=kind
    )
    ds = host_system.configManager.datastoreSystem.CreateNasDatastore(spec)
    try:
        yield ds
    finally:
        WaitForTask(ds.Destroy_Task())


def reconfigure(vm: Any, **spec: Any) -> None:
    WaitForTask(vm.ReconfigVM_Task(spec=vim.vm.ConfigSpec(**spec)))


@pytest.fixture
def fresh_vm(vcsim: Vcsim, request: pytest.FixtureRequest) -> Iterator[str]:
    """A new powered-off machine with one LSI Logic controller and one 16 MiB disk, deleted afterwards."""
    name = f"t-{request.node.name}"[:60].replace("[", "-").replace("]", "")
    with vcsim.fabric() as fabric:
        fabric.create_machine(
            MachineSpec(
                name=name,
                host="DC0_H0",
                datastore="LocalDS_0",
                os_type=OsType.LINUX,
                disks=(DiskSpec(label="d0", size_bytes=16 << 20),),
            )
        )
        yield name
        if fabric.discover().machine(name) is not None:
            fabric.power_off(name)
            fabric.delete_machine(name)


@pytest.fixture
def admin_si(vcsim: Vcsim) -> Iterator[Any]:
    si = vcsim.service_instance("admin")
    yield si
    Disconnect(si)
