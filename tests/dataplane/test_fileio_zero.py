"""Zero detection (`fileio.is_zero`): the export punches a hole for an all-zero write, so a payload
with one byte set anywhere must never count as zero, whatever its length."""

from __future__ import annotations

import pytest

from siterecovery.dataplane.fileio import ZERO_CHUNK, is_zero


@pytest.mark.parametrize("n", [1, 511, 512, 4096, 4097, 65536, 3 * 4096, ZERO_CHUNK, ZERO_CHUNK + 4096])
def test_is_zero_sees_any_set_byte(n: int) -> None:
    data = bytearray(n)
    assert is_zero(memoryview(data))
    for at in {0, n // 2, n - 1}:
        data[at] = 1
        assert not is_zero(memoryview(data))
        data[at] = 0
    assert is_zero(memoryview(b""))
