"""The journal drops a streamed write's pages from the page cache once they are durable (issue 16)."""

from __future__ import annotations

import os
from pathlib import Path

from siterecovery.dataplane.journal.ranges import STREAM_RUN
from tests.journal.conftest import OpenDisk
from tests.journal.crash_child import resident_bytes

PAGE = os.sysconf("SC_PAGE_SIZE")


def test_streamed_writes_leave_the_page_cache_once_durable(open_disk: OpenDisk, tmp_path: Path) -> None:
    disk = open_disk(drop_batch=4 * STREAM_RUN)  # dropped once 4 MiB of streamed runs are durable
    data = os.urandom(4 * STREAM_RUN)
    view = memoryview(data)
    for i in range(4):  # a sync's blocks, in two batches: two runs of 2 MiB
        disk.apply_write(i, i * STREAM_RUN, view[i * STREAM_RUN : (i + 1) * STREAM_RUN])
        if i == 1:
            disk.sync()
    small = os.urandom(PAGE)
    disk.apply_write(4, 8 * STREAM_RUN, memoryview(small))  # a small write: its page may stay
    image = tmp_path / "disk.img"
    disk.sync()
    assert resident_bytes(image) <= PAGE, "the streamed runs' pages stayed in the page cache"
    with open(image, "rb") as f:  # and the bytes are on the disk
        assert f.read(len(data)) == data
        f.seek(8 * STREAM_RUN)
        assert f.read(PAGE) == small
