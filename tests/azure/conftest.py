"""A real Azurite blob service for the Azure storage tests: one process per session, on a random port.

Azurite is started on loopback with its data in a temporary folder and the well-known development
account; every test gets its own container. The SDK clients pin `STORAGE_API_VERSION`, which
Azurite accepts without `--skipApiVersionCheck` (so a version it refuses would fail these tests).
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import pytest
from azure.storage.blob import ContainerClient

from siterecovery.dataplane.page_blob import STORAGE_API_VERSION, open_container
from siterecovery.pki import CertificateAuthority
from tests.conftest import free_port, require_tool
from tests.dataplane.conftest import plane  # noqa: F401 - the real data-plane processes (tests/dataplane's fixture)

# Azurite's published development account (not a secret: it is in Azurite's documentation).
ACCOUNT = "devstoreaccount1"
ACCOUNT_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="


@dataclass(frozen=True)
class Azurite:
    port: int
    location: Path

    @property
    def connection_string(self) -> str:
        return (
            f"DefaultEndpointsProtocol=http;AccountName={ACCOUNT};AccountKey={ACCOUNT_KEY};"
            f"BlobEndpoint=http://127.0.0.1:{self.port}/{ACCOUNT};"
        )

    def container_client(self, name: str) -> ContainerClient:
        """An existing container (e.g. the fake ARM's managed disks), with the account's key."""
        return ContainerClient.from_connection_string(
            self.connection_string, name, api_version=STORAGE_API_VERSION
        )

    def container(self, prefix: str = "t") -> ContainerClient:
        return open_container(self.connection_string, f"{prefix}-{uuid.uuid4().hex[:12]}")


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


@pytest.fixture(scope="session")
def azurite(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Azurite]:
    exe = require_tool("azurite-blob")
    location = tmp_path_factory.mktemp("azurite")
    port = free_port()
    log = open(location / "azurite.log", "wb")  # noqa: SIM115 - closed after the process ends
    proc = subprocess.Popen(
        [exe, "--blobHost", "127.0.0.1", "--blobPort", str(port), "--location", str(location), "--loose"],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 60
        while not _listening(port):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"azurite did not start:\n{(location / 'azurite.log').read_text()}")
            time.sleep(0.1)
        yield Azurite(port, location)
    finally:
        _stop(proc, log)


@dataclass(frozen=True)
class FakeArmEndpoint:
    """A fake ARM process (tests/azure/fake_arm_server.py) on https://127.0.0.1:port."""

    port: int
    ca_file: Path  # the test CA that signed its certificate (clients trust it)
    secret: str  # the one client secret its token endpoint accepts
    disks: str  # the Azurite container holding its managed disks and snapshots

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    @property
    def tenant(self) -> str:
        return "fake-tenant"

    @property
    def client_id(self) -> str:
        return "00000000-0000-0000-0000-00000000c11e"


@pytest.fixture
def fake_arm_endpoint(
    request: pytest.FixtureRequest, azurite: Azurite, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[FakeArmEndpoint]:
    """A fresh fake ARM (empty resource group) for one test; this process trusts its CA. A module
    sets FAKE_ARM_CORE_QUOTA for a smaller regional core quota (AZ-QUOTA), FAKE_ARM_CONNECTIONS for its
    gateway connections ("NAME,STATUS,VNET_ID", AZ-VPN)."""
    folder = tmp_path / "fake-arm"
    ca = CertificateAuthority.load_or_create(folder / "ca", "fake ARM test CA")
    cert, key, ca_file = ca.issue("fake-arm", ("127.0.0.1",)).write(folder, "arm")
    disks = f"disks-{uuid.uuid4().hex[:12]}"
    port_file, secret = folder / "port", uuid.uuid4().hex
    log = open(folder / "fake-arm.log", "wb")  # noqa: SIM115 - closed after the process ends
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.azure.fake_arm_server", "--port-file", str(port_file),
         "--cert", str(cert), "--key", str(key), "--secret", secret,
         "--storage", azurite.connection_string, "--container", disks,
         "--core-quota", str(getattr(request.module, "FAKE_ARM_CORE_QUOTA", 10)),
         *(f"--connection={c}" for c in getattr(request.module, "FAKE_ARM_CONNECTIONS", ()))],
        stdout=log, stderr=subprocess.STDOUT, cwd=Path(__file__).parents[2],
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not port_file.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"the fake ARM did not start:\n{(folder / 'fake-arm.log').read_text()}")
            time.sleep(0.1)
        # The SDK's transport (requests) trusts the test CA as the server process will.
        monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(ca_file))
        yield FakeArmEndpoint(int(port_file.read_text()), ca_file, secret, disks)
    finally:
        _stop(proc, log)


def _stop(proc: subprocess.Popen[bytes], log: IO[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=30)
    log.close()
