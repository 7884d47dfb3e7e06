"""What a component may report (`control.reports.validated_stats`), checked without a server.

Numbers are screened on the report's JSON text and walked exactly only when a token could be out
of range; these cases pin both paths: every number that does not fit 64 bits or is not finite is
refused with its field's path, wherever it is nested, and digits inside strings refuse nothing.
"""

from __future__ import annotations

from typing import Any

import pytest

from siterecovery.control.reports import validated_stats
from siterecovery.errors import SiteRecoveryError


def _agent(**pair: Any) -> dict[str, Any]:
    return {"pairs": [{"pair_id": "vm-1e5-12345678901234567890", "state": "protected", **pair}]}


def _master_target(**pair: Any) -> dict[str, Any]:
    return {"pairs": [{"pair_id": "p", "applied_seq": 3, **pair}], "points_seq": 4}


@pytest.mark.parametrize(
    ("kind", "stats", "field"),
    [
        pytest.param("agent", _agent(bytes_done=2**63), "stats.pairs.0.bytes_done", id="2**63"),
        pytest.param("agent", _agent(captured_seq=-(2**63) - 1), "stats.pairs.0.captured_seq", id="int-neg"),
        pytest.param("agent", _agent(last_write_time=1e300), "stats.pairs.0.last_write_time", id="1e300"),
        pytest.param("agent", _agent(last_write_time=float("inf")), "stats.pairs.0.last_write_time"),
        pytest.param(
            "master-target", _master_target(last_applied_time=float("nan")), "stats.pairs.0.last_applied_time"
        ),
        pytest.param("process-server", {"throughput_bytes_per_s": 9.3e18}, "stats.throughput_bytes_per_s"),
    ],
)
def test_numbers_that_do_not_fit_are_refused_naming_the_field(
    kind: str, stats: dict[str, Any], field: str
) -> None:
    with pytest.raises(SiteRecoveryError) as caught:
        validated_stats(kind, stats)
    assert caught.value.status == 422
    assert [p.detail for p in caught.value.problems] == [{"field": field}]


@pytest.mark.parametrize(
    ("kind", "stats"),
    [
        pytest.param("agent", _agent(bytes_done=2**63 - 1, captured_seq=-1, last_write_time=1e-7)),
        pytest.param("agent", {"bookmark_errors": {"NaN-1e99": "Infinity 99999999999999999999"}}),
        pytest.param("master-target", _master_target(last_applied_time=1.7e9, journal_bytes=1 << 40)),
        pytest.param("process-server", {"cache_used_bytes": 10, "cache_capacity_bytes": 100}),
    ],
)
def test_valid_reports_pass_unchanged(kind: str, stats: dict[str, Any]) -> None:
    assert validated_stats(kind, stats) is stats
