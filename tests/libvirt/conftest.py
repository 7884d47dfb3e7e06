"""libvirt test fixtures: one real libvirtd per module (see daemon.py), two transient directory pools
and two isolated networks standing for two sites on one host."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import IN_CI

if not IN_CI:  # libvirt-python is an extra (`make pytest` adds it once libvirt's headers are there)
    pytest.importorskip("libvirt", reason="libvirt-python is not installed (make system-deps pytest)")

import libvirt
from siterecovery.fabrics.libvirt import LibvirtFabric
from tests.dataplane.conftest import (
    plane,  # noqa: F401 - the real data-plane processes (tests/dataplane's fixture)
)
from tests.libvirt.daemon import PREFIX, Daemon

# Host-wide names: one per test process, so two sessions on one machine never delete each other's.
BRIDGES = (f"srbr{os.getpid()}a", f"srbr{os.getpid()}b")


@dataclass(frozen=True)
class Sites:
    daemon: Daemon
    folder: Path
    pools: dict[str, Path]  # pool name -> directory
    networks: tuple[str, ...]

    @property
    def uri(self) -> str:
        return self.daemon.uri

    def fabric(self, name: str = "kvm") -> LibvirtFabric:
        return LibvirtFabric(self.uri, name=name, domain_type="qemu")


def _pool(conn: libvirt.virConnect, name: str, path: Path) -> None:
    path.mkdir(parents=True)
    path.chmod(0o755)
    xml = f"<pool type='dir'><name>{name}</name><target><path>{path}</path></target></pool>"
    conn.storagePoolCreateXML(xml, 0)


def _network(conn: libvirt.virConnect, name: str, bridge: str) -> None:
    # A host bridge handed to libvirt (forward mode bridge), what operators with their own bridges
    # use; it needs no dnsmasq and no firewall rules. The bridge is the test's own, unconnected.
    subprocess.run(["ip", "link", "del", bridge], capture_output=True, timeout=30)  # a killed run's
    subprocess.run(["ip", "link", "add", bridge, "type", "bridge"], check=True, timeout=30)
    subprocess.run(["ip", "link", "set", bridge, "up"], check=True, timeout=30)
    conn.networkCreateXML(
        f"<network><name>{name}</name><forward mode='bridge'/><bridge name='{bridge}'/></network>"
    )


@pytest.fixture(scope="module")
def sites() -> Iterator[Sites]:
    # Not under pytest's 0700 folder: QEMU runs as libvirt-qemu and must reach the pools' files.
    folder = Path(tempfile.mkdtemp(prefix="sr-libvirt-"))
    folder.chmod(0o755)
    daemon = Daemon(folder / "daemon")
    daemon.folder.mkdir()
    try:
        daemon.start()
        conn = libvirt.open(daemon.uri)
        pools = {f"{PREFIX}a": folder / "pool-a", f"{PREFIX}b": folder / "pool-b"}
        for name, path in pools.items():
            _pool(conn, name, path)
        networks = (f"{PREFIX}net-a", f"{PREFIX}net-b")
        for net, bridge in zip(networks, BRIDGES, strict=True):
            _network(conn, net, bridge)
        conn.close()
        yield Sites(daemon, folder, pools, networks)
    finally:
        daemon.stop()
        for bridge in BRIDGES:
            subprocess.run(["ip", "link", "del", bridge], capture_output=True, timeout=30)
        shutil.rmtree(folder, ignore_errors=True)


@dataclass(frozen=True)
class TwoSites:
    """Two libvirt hosts: two libvirtd instances (two URIs), each with a pool and a network of
    the same name on its own bridge, as two KVM hosts an operator sets up alike."""

    a: Sites
    b: Sites


NETWORK = f"{PREFIX}net"


@pytest.fixture(scope="module")
def two_sites() -> Iterator[TwoSites]:
    folder = Path(tempfile.mkdtemp(prefix="sr-libvirt2-"))
    folder.chmod(0o755)
    daemons = (Daemon(folder / "daemon-a"), Daemon(folder / "daemon-b", private=True))
    try:
        built = []
        for daemon, site, bridge in zip(daemons, "ab", BRIDGES, strict=True):
            daemon.folder.mkdir()
            daemon.start()
            conn = libvirt.open(daemon.uri)
            pool = folder / f"pool-{site}"
            _pool(conn, f"{PREFIX}{site}", pool)
            _network(conn, NETWORK, bridge)
            conn.close()
            built.append(Sites(daemon, folder, {f"{PREFIX}{site}": pool}, (NETWORK,)))
        yield TwoSites(*built)
    finally:
        for daemon in reversed(daemons):
            daemon.stop()
        for bridge in BRIDGES:
            subprocess.run(["ip", "link", "del", bridge], capture_output=True, timeout=30)
        shutil.rmtree(folder, ignore_errors=True)
