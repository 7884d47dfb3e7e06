"""Which ranges of a page blob changed since a base snapshot: one interface, two implementations.

Failback from Azure sends only what the recovery VM changed since its disks' base snapshot (taken
before the VM first booted). Azure storage answers that directly (Get Page Ranges with
`prevsnapshot`, or `prevsnapshoturl` for managed disks): updated ranges, and *cleared* ranges
(trimmed or cleared pages, which read as zeroes). Not every endpoint answers it right: Azurite
returns every range of the blob and never a cleared one (Azure/Azurite#812), and a diff that
misses a cleared range would leave stale data on the on-premises disk. So `choose()` runs a
self-test first: on a probe blob it writes four pages, snapshots, rewrites page 1 and clears page
3, and uses `ServiceDiff` only when the service reports exactly those two changes. Otherwise it
uses `ContentCompare`, which reads both versions in 4 MiB blocks, hashes them, and compares the
blocks that differ page by page: exact on any endpoint, at the price of reading the disk twice
(ranges that hold no pages in either version are skipped without reading; beyond the base's
size, a grown disk's base reads as zeroes).
"""

from __future__ import annotations

import contextlib
import os
import uuid
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Protocol

import xxhash
from azure.core.exceptions import AzureError
from azure.storage.blob import BlobClient, ContainerClient, PageRange

from siterecovery.dataplane.fileio import data_extents, punch_or_zero
from siterecovery.dataplane.page_blob import MAX_PUT, PAGE, storage_error

_ZERO_PAGE = bytes(PAGE)


class DiffMethod(StrEnum):
    SERVICE = "service-diff"
    CONTENT = "content-compare"


@dataclass(frozen=True)
class ChangedRange:
    """[offset, offset+length) changed since the base; `cleared` when it now reads as zeroes."""

    offset: int
    length: int
    cleared: bool

    @property
    def end(self) -> int:
        return self.offset + self.length


class ChangedRanges(Protocol):
    method: DiffMethod

    def changes(self, blob: BlobClient, base_snapshot: str) -> list[ChangedRange]:
        """The blob's changed ranges since `base_snapshot` (a snapshot id of the same blob), sorted."""
        ...


def _merge(ranges: list[ChangedRange]) -> list[ChangedRange]:
    out: list[ChangedRange] = []
    for r in sorted(ranges, key=lambda r: r.offset):
        last = out[-1] if out else None
        if last is not None and last.end == r.offset and last.cleared == r.cleared:
            out[-1] = ChangedRange(last.offset, last.length + r.length, r.cleared)
        else:
            out.append(r)
    return out


class ServiceDiff:
    """The storage service's own diff (one listing call, no data read)."""

    method = DiffMethod.SERVICE

    def changes(self, blob: BlobClient, base_snapshot: str) -> list[ChangedRange]:
        try:
            pages = list(blob.list_page_ranges(previous_snapshot=base_snapshot))
        except AzureError as exc:
            raise storage_error(f"listing changed pages of {blob.blob_name!r}", exc) from exc
        return _merge([ChangedRange(lo, hi - lo, bool(p.cleared)) for p in pages for lo, hi in [_span(p)]])


def _span(page: PageRange) -> tuple[int, int]:
    """[start, end) of a listed page range (the service's end is inclusive)."""
    return int(page.start or 0), int(page.end or 0) + 1


def _page_extents(blob: BlobClient) -> list[tuple[int, int]]:
    return [_span(p) for p in blob.list_page_ranges()]


def _at(blob: BlobClient, snapshot: str) -> BlobClient:
    return BlobClient.from_blob_url(
        blob.url, credential=blob.credential, snapshot=snapshot, api_version=blob.api_version
    )


def _union(a: list[tuple[int, int]], b: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for lo, hi in sorted(a + b):
        if out and lo <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], hi))
        else:
            out.append((lo, hi))
    return out


class ContentCompare:
    """Hash-compare the base snapshot and the current blob in 4 MiB blocks; exact on every endpoint."""

    method = DiffMethod.CONTENT

    def __init__(self, block: int = MAX_PUT) -> None:
        self.block = block
        self.bytes_read = 0

    def changes(self, blob: BlobClient, base_snapshot: str) -> list[ChangedRange]:
        return self.compare(blob, _at(blob, base_snapshot))

    def compare(self, blob: BlobClient, base: BlobClient, size: int | None = None) -> list[ChangedRange]:
        """`blob`'s changes against any other blob `base` (e.g. a managed disk's snapshot, by SAS),
        in its first `size` bytes when given (a managed disk's VHD footer is not disk content)."""
        out: list[ChangedRange] = []
        try:
            base_size = int(base.get_blob_properties().size)
            limit = size if size is not None else int(blob.get_blob_properties().size)
            for lo, hi in _union(_page_extents(blob), _page_extents(base)):
                hi = min(hi, limit)
                for at in range(lo - lo % self.block, hi, self.block):
                    start, end = max(at, lo), min(at + self.block, hi)
                    out += self._compare(blob, base, start, end, base_size)
        except AzureError as exc:
            raise storage_error(f"comparing {blob.blob_name!r} with its base", exc) from exc
        return _merge(out)

    def compare_file(self, blob: BlobClient, path: Path, size: int) -> list[ChangedRange]:
        """`blob`'s first `size` bytes against a local disk image holding an unknown older copy
        (what a failback must send when no base snapshot is known to equal that disk): blocks
        neither side holds data in are skipped; the rest are read from both and compared."""
        out: list[ChangedRange] = []
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            local = [(lo, lo + n) for lo, n in data_extents(fd, 0, size)]
            for lo, hi in _union(_page_extents(blob), local):
                hi = min(hi, size)
                for at in range(lo - lo % self.block, hi, self.block):
                    start, end = max(at, lo), min(at + self.block, hi)
                    new = self._read(blob, start, end, end)
                    old = os.pread(fd, end - start, start)
                    out += _page_changes(start, new, old + bytes(end - start - len(old)))
        except AzureError as exc:
            raise storage_error(f"comparing {blob.blob_name!r} with {path}", exc) from exc
        finally:
            os.close(fd)
        return _merge(out)

    def _read(self, blob: BlobClient, start: int, end: int, limit: int) -> bytes:
        if start >= limit:
            return bytes(end - start)
        data = blob.download_blob(offset=start, length=min(end, limit) - start).readall()
        self.bytes_read += len(data)
        return data + bytes(end - start - len(data))

    def _compare(
        self, blob: BlobClient, base: BlobClient, start: int, end: int, base_size: int
    ) -> list[ChangedRange]:
        new = self._read(blob, start, end, end)
        old = self._read(base, start, end, base_size)
        return _page_changes(start, new, old)


def _page_changes(start: int, new: bytes, old: bytes) -> list[ChangedRange]:
    """The pages of a block at `start` that differ between its `new` and `old` bytes."""
    if xxhash.xxh3_128_digest(new) == xxhash.xxh3_128_digest(old):
        return []
    out: list[ChangedRange] = []
    for at in range(0, len(new), PAGE):
        page = new[at : at + PAGE]
        if page != old[at : at + PAGE]:
            out.append(ChangedRange(start + at, len(page), page == _ZERO_PAGE[: len(page)]))
    return out


def self_test(container: ContainerClient) -> bool:
    """Does the service's diff report exactly one rewritten and one cleared page after a snapshot?"""
    probe = container.get_blob_client(f"siterecovery-diff-probe-{uuid.uuid4().hex}")
    try:
        probe.create_page_blob(4 * PAGE)
        probe.upload_page(b"\x01" * (4 * PAGE), offset=0, length=4 * PAGE)
        snapshot = str(probe.create_snapshot()["snapshot"])
        probe.upload_page(b"\x02" * PAGE, offset=PAGE, length=PAGE)
        probe.clear_page(offset=3 * PAGE, length=PAGE)
        got = ServiceDiff().changes(probe, snapshot)
    except AzureError as exc:
        raise storage_error("testing the page-range diff", exc) from exc
    finally:
        # A leftover probe blob is harmless; its name says what it is.
        with contextlib.suppress(AzureError):
            probe.delete_blob(delete_snapshots="include")
    return got == [ChangedRange(PAGE, PAGE, False), ChangedRange(3 * PAGE, PAGE, True)]


def choose(container: ContainerClient) -> ChangedRanges:
    """The service's diff where its self-test passes, else the content compare."""
    return ServiceDiff() if self_test(container) else ContentCompare()


def copy_changes(source: BlobClient, changes: list[ChangedRange], target: Path) -> int:
    """Make `target` (a local disk image holding the base) equal to `source`: write the updated
    ranges, punch the cleared ones; returns the bytes read. fsyncs before returning."""
    moved = 0
    fd = os.open(target, os.O_RDWR | os.O_CLOEXEC)
    try:
        for r in changes:
            if r.cleared:
                punch_or_zero(fd, r.offset, r.length)
                continue
            for at in range(r.offset, r.end, MAX_PUT):
                n = min(MAX_PUT, r.end - at)
                try:
                    data = source.download_blob(offset=at, length=n).readall()
                except AzureError as exc:
                    raise storage_error(f"reading {source.blob_name!r}", exc) from exc
                view = memoryview(data)
                while view:
                    view = view[os.pwrite(fd, view, at + len(data) - len(view)) :]
                moved += len(data)
        os.fsync(fd)
    finally:
        os.close(fd)
    return moved
