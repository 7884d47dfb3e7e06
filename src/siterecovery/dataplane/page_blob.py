"""Replica disks as Azure page blobs: the cloud-side master target's `DiskApplier`.

A page blob takes writes of whole 512-byte pages, at most 4 MiB per Put Page, and clears pages
(they then read as zeroes and hold no storage) with one request of any length. The applier keeps
one pending run of adjacent writes (or of adjacent zero ranges) and sends it when the next range
is not adjacent, when it reaches 4 MiB, or at `sync()`: a full sync's 64 KiB frames become 4 MiB
Put Page calls. Because every run is sent before a non-adjacent range is taken, the blob always
holds the stream applied in sequence order and an unaligned edge is completed by reading that
page back from the blob (read-modify-write of at most two pages per range). A Put Page is
durable when it returns, so `sync()` sends the pending run, then records the applied sequence in
the pair's local state file, exactly as `DirectApplier` does for a local image.

The blob is the disk followed by a 512-byte fixed-VHD footer: Azure imports a managed disk only
from a fixed VHD, so a failover can create its disks straight from the replica blobs (and
`qemu-img` reads a downloaded replica as `vpc`).

The storage service version is pinned (`STORAGE_API_VERSION`): the SDK's default is newer than
what emulators and older Azure Stack endpoints accept, and a pinned version keeps behaviour fixed.
"""

from __future__ import annotations

import struct
import time
import uuid
from dataclasses import dataclass
from pathlib import Path, PurePath

from azure.core.exceptions import AzureError, ResourceExistsError, ResourceNotFoundError
from azure.storage.blob import BlobClient, BlobServiceClient, ContainerClient

from siterecovery.dataplane.apply import AppliedSeq, ApplierFactory, DiskApplier
from siterecovery.errors import Problem, SiteRecoveryError, Status

PAGE = 512
MAX_PUT = 4 << 20  # the service's limit for one Put Page
STORAGE_API_VERSION = "2025-11-05"
CONNECTION_ENV = "SITERECOVERY_AZURE_STORAGE"  # a storage connection string; never on a command line


_VHD_EPOCH = 946684800  # 2000-01-01T00:00:00Z, the VHD format's time origin


def _chs(size: int) -> tuple[int, int, int]:
    """The VHD specification's cylinders/heads/sectors for a disk of `size` bytes."""
    total = min(size // PAGE, 65535 * 16 * 255)
    if total >= 65535 * 16 * 63:
        spt, heads = 255, 16
        cth = total // spt
    else:
        spt = 17
        cth = total // spt
        heads = max((cth + 1023) // 1024, 4)
        if cth >= heads * 1024 or heads > 16:
            spt, heads = 31, 16
            cth = total // spt
        if cth >= heads * 1024:
            spt, heads = 63, 16
            cth = total // spt
    return cth // heads, heads, spt


def vhd_footer(size: int) -> bytes:
    """The 512-byte footer that makes `size` bytes of raw disk a fixed VHD."""
    cylinders, heads, spt = _chs(size)
    fields = struct.pack(
        ">8sIIQI4sI4sQQHBBI",
        b"conectix",
        2,  # features: reserved bit set
        0x00010000,  # format version
        0xFFFFFFFFFFFFFFFF,  # data offset: none (fixed disk)
        int(time.time()) - _VHD_EPOCH,
        b"srcv",  # creator application
        0x00010000,
        b"Wi2k",
        size,  # original size
        size,  # current size
        cylinders,
        heads,
        spt,
        2,  # disk type: fixed
    )
    unique = uuid.uuid4().bytes
    body = fields + b"\0\0\0\0" + unique + b"\0"
    checksum = ~sum(body) & 0xFFFFFFFF
    footer = fields + struct.pack(">I", checksum) + unique + b"\0"
    return footer + bytes(PAGE - len(footer))


def align_down(n: int) -> int:
    return n - n % PAGE


def align_up(n: int) -> int:
    return -(-n // PAGE) * PAGE


def storage_error(what: str, exc: Exception) -> SiteRecoveryError:
    return SiteRecoveryError(
        Problem(
            code="azure-storage-unavailable",
            message=f"Azure storage refused or did not answer while {what}: {exc}",
            remediation="Check the storage account's network rules and the connection string, then retry.",
        ),
        Status.UNAVAILABLE,
    )


def open_container(connection_string: str, container: str) -> ContainerClient:
    """The replica container, created when missing, on the pinned storage service version."""
    service = BlobServiceClient.from_connection_string(connection_string, api_version=STORAGE_API_VERSION)
    client = service.get_container_client(container)
    try:
        client.create_container()
    except ResourceExistsError:
        pass
    except AzureError as exc:
        raise storage_error(f"creating container {container!r}", exc) from exc
    return client


@dataclass
class _Run:
    """Adjacent page-aligned ranges waiting to be sent: data (`buf`) or pages to clear (`zero`)."""

    start: int
    buf: bytearray
    zero: bool
    length: int

    @property
    def end(self) -> int:
        return self.start + self.length


class PageBlobWriter:
    """Writes and clears byte ranges of one page blob, merging adjacent ranges into few requests."""

    def __init__(self, blob: BlobClient, size: int) -> None:
        self.blob = blob
        self.size = align_up(size)
        self.requests = 0  # Put Page calls (writes and clears), for tests and statistics
        self._run: _Run | None = None
        try:
            try:
                current = int(blob.get_blob_properties().size)
            except ResourceNotFoundError:
                blob.create_page_blob(self.size + PAGE)
                current = 0
            if current < self.size + PAGE:
                if current:
                    blob.resize_blob(self.size + PAGE)
                blob.upload_page(vhd_footer(self.size), offset=self.size, length=PAGE)
        except AzureError as exc:
            raise storage_error(f"opening page blob {blob.blob_name!r}", exc) from exc

    def write(self, offset: int, data: memoryview | bytes) -> None:
        view = memoryview(data)
        end = offset + len(view)
        lo, hi = align_down(offset), align_up(end)
        if lo == offset and hi == end:
            self._add(offset, view, zero=False)
            return
        # An unaligned edge: send what is pending so the blob is current, then complete the pages.
        self.flush()
        buf = bytearray(hi - lo)
        self._read_into(buf, lo, offset)
        self._read_into(buf, end, hi, base=lo)
        buf[offset - lo : end - lo] = view
        self._add(lo, memoryview(buf), zero=False)

    def zero(self, offset: int, length: int) -> None:
        end = offset + length
        inner_lo, inner_hi = align_up(offset), align_down(end)
        if inner_lo >= inner_hi:
            self.write(offset, bytes(length))
            return
        if inner_lo > offset:
            self.write(offset, bytes(inner_lo - offset))
        self._add(inner_lo, memoryview(b""), zero=True, length=inner_hi - inner_lo)
        if end > inner_hi:
            self.write(inner_hi, bytes(end - inner_hi))

    def flush(self) -> None:
        run, self._run = self._run, None
        if run is None or run.length == 0:
            return
        try:
            if run.zero:
                self.blob.clear_page(offset=run.start, length=run.length)
                self.requests += 1
                return
            view = memoryview(run.buf)
            for at in range(0, run.length, MAX_PUT):
                chunk = bytes(view[at : at + MAX_PUT])
                self.blob.upload_page(chunk, offset=run.start + at, length=len(chunk))
                self.requests += 1
        except AzureError as exc:
            raise storage_error(f"writing page blob {self.blob.blob_name!r}", exc) from exc

    def _add(self, offset: int, view: memoryview, *, zero: bool, length: int | None = None) -> None:
        n = len(view) if length is None else length
        run = self._run
        full = run is not None and not zero and run.length >= MAX_PUT
        if run is not None and (run.zero != zero or run.end != offset or full):
            self.flush()
            run = None
        if run is None:
            self._run = _Run(offset, bytearray(view), zero, n)
            return
        if not zero:
            run.buf += view
        run.length += n

    def _read_into(self, buf: bytearray, lo: int, hi: int, base: int | None = None) -> None:
        """Fill buf[lo-base : hi-base] with the blob's bytes (the edge of a partly written page)."""
        if hi <= lo:
            return
        start = lo if base is None else base
        try:
            data = self.blob.download_blob(offset=lo, length=hi - lo).readall()
        except AzureError as exc:
            raise storage_error(f"reading page blob {self.blob.blob_name!r}", exc) from exc
        buf[lo - start : hi - start] = data


class PageBlobApplier(AppliedSeq):
    """`DiskApplier` onto a page blob; the newest state only (point-in-time is the blob's snapshots)."""

    def __init__(self, pair_id: str, blob: BlobClient, size: int, state_dir: Path) -> None:
        self.pair_id = pair_id
        self.writer = PageBlobWriter(blob, size)
        super().__init__(state_dir)

    def apply_write(self, seq: int, offset: int, data: memoryview) -> None:
        self.writer.write(offset, data)
        self._pending = seq

    def apply_zero(self, seq: int, offset: int, length: int) -> None:
        self.writer.zero(offset, length)
        self._pending = seq

    def sync(self) -> None:
        # The writer holds back the run it is merging; it goes out even when no sequence is pending.
        self.writer.flush()
        self._commit(lambda: None)

    def close(self) -> None:
        self.writer.flush()


def blob_name(path: PurePath | str) -> str:
    """The page blob a target disk path names: its folder and file name (`web-01/disk0.img`), so
    disks with the same label on different machines get different blobs."""
    return "/".join(PurePath(path).parts[-2:])


def page_blob_applier_factory(container: ContainerClient) -> ApplierFactory:
    """An `ApplierFactory` for the master target: each pair's target disk is a page blob."""

    def make(pair_id: str, path: Path, size: int, state_dir: Path) -> DiskApplier:
        return PageBlobApplier(pair_id, container.get_blob_client(blob_name(path)), size, state_dir)

    return make


def page_blob_factory(container: str | None, connection: str | None) -> ApplierFactory | None:
    """The master target's page-blob backend when a container is named (`--page-blob-container`);
    `connection` is the storage connection string (the master target's `azure_storage` setting)."""
    if container is None:
        return None
    if not connection:
        raise SiteRecoveryError(
            Problem(
                code="azure-storage-not-configured",
                message=f"Page-blob container {container!r} is named but ${CONNECTION_ENV} is not set.",
                remediation=f"Set ${CONNECTION_ENV} to the storage account's connection string.",
            ),
            Status.BAD_REQUEST,
        )
    return page_blob_applier_factory(open_container(connection, container))
