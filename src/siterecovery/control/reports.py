"""What a component may report: its heartbeat `stats`, validated before anything is stored.

A component reports the Stats model of its kind (`dataplane/assignments.py`). The configuration
server trusts none of it: the stats are checked against that model strictly (no "5" for 5, no
unknown fields, enums by value), every number must be finite and fit a signed 64-bit integer,
and the quantities that `/metrics`, the portal and the health rules read must be non-negative.
A report that fails is refused with a 422 naming the field and is not stored, so one confused or
hostile component can never make `/metrics` or the portal fail for everybody.

The process server's fields all have defaults here (a partial report, e.g. only its cache, is
still a valid report); the other kinds' models already default every field.
"""

from __future__ import annotations

import math
import re
from typing import Any

import pydantic_core
from pydantic import BaseModel, Field, ValidationError

from siterecovery.dataplane.assignments import AgentStats, CacheHealth, MasterTargetStats, ProcessServerStats
from siterecovery.errors import Problem, SiteRecoveryError, Status
from siterecovery.store.states import ComponentKind

# Anything larger cannot be a byte count, a sequence number or a time, and would overflow a
# PostgreSQL bigint or a Prometheus float's exact range.
MAX_NUMBER = 2**63 - 1
_Count = Field(default=0, ge=0, le=MAX_NUMBER)


class ProcessServerReport(ProcessServerStats):
    cache_used_bytes: int = _Count
    cache_capacity_bytes: int = _Count
    cache_free_percent: float = Field(default=100.0, ge=-MAX_NUMBER, le=MAX_NUMBER)
    cache_health: CacheHealth = CacheHealth.OK
    backlog_bytes: int = _Count
    throughput_bytes_per_s: float = Field(default=0.0, ge=0, le=MAX_NUMBER)
    drain_seconds: float | None = Field(default=None, ge=0, le=MAX_NUMBER)
    pairs: int = _Count


class MasterTargetReport(MasterTargetStats):
    attached_disks: int = _Count


class AgentReport(AgentStats):
    pass


_REPORTS: dict[str, type[BaseModel]] = {
    ComponentKind.PROCESS: ProcessServerReport,
    ComponentKind.MASTER_TARGET: MasterTargetReport,
    ComponentKind.AGENT: AgentReport,
}


def _problem(field: str, message: str) -> Problem:
    return Problem(
        code="invalid-input",
        message=f"Field '{field}': {message}.",
        remediation="The component sent a report this server cannot accept; upgrade or restart it.",
        detail={"field": field},
    )


def _out_of_range(value: Any, path: str) -> str | None:
    """The first number that is not finite or does not fit 64 bits, as a dotted path."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        finite = not isinstance(value, float) or math.isfinite(value)
        return None if finite and abs(value) <= MAX_NUMBER else path
    if isinstance(value, dict):
        items: list[tuple[str, Any]] = [(str(k), v) for k, v in value.items()]
    elif isinstance(value, list):
        items = [(str(i), v) for i, v in enumerate(value)]
    else:
        return None
    for key, child in items:
        bad = _out_of_range(child, f"{path}.{key}")
        if bad is not None:
            return bad
    return None


# In the report's JSON (`pydantic_core.to_json`, infinities and NaN as constants), every number
# that may not fit 64 bits or is not finite shows as one of: a run of 19 digits or more (2**63
# has 19), a digit followed by an exponent (`1e+20`), `Infinity`, `NaN`. Such a run may also be
# inside a string (a name with digits): then the exact walk of `_out_of_range` decides. A master
# target's report with 200 pairs holds ~2,000 numbers: walking them in Python was a third of
# validating it, and so was one regular expression over the whole text; these byte searches
# (C loops) cost a tenth of either.
_DIGITS = bytes.maketrans(b"0123456789", b"0" * 10)
_LONG_NUMBER = b"0" * 19
_EXPONENT = re.compile(rb"e[-+]?[0-9]")
_DIGIT_BYTES = frozenset(b"0123456789")


def _suspect(encoded: bytes) -> bool:
    """Whether the report's JSON may hold a number out of range (see above); never misses one."""
    if b"Infinity" in encoded or b"NaN" in encoded or _LONG_NUMBER in encoded.translate(_DIGITS):
        return True
    return any(m.start() > 0 and encoded[m.start() - 1] in _DIGIT_BYTES for m in _EXPONENT.finditer(encoded))


def validated_stats(kind: str, stats: dict[str, Any]) -> dict[str, Any]:
    """`stats` unchanged if it is a valid report of a `kind` component; else a 422 naming fields."""
    # Through JSON, strictly: exactly what a component's `model_dump(mode="json")` produces.
    # Encoded by pydantic's serializer (several times faster than `json.dumps` on large reports).
    encoded = pydantic_core.to_json(stats, inf_nan_mode="constants")
    bad = _out_of_range(stats, "stats") if _suspect(encoded) else None
    if bad is not None:
        raise SiteRecoveryError(_problem(bad, "numbers must be finite and fit 64 bits"), Status.UNPROCESSABLE)
    model = _REPORTS.get(kind)
    if model is None:
        if stats:
            raise SiteRecoveryError(_problem("stats", f"a {kind} reports no stats"), Status.UNPROCESSABLE)
        return stats
    try:
        model.model_validate_json(encoded, strict=True)
    except ValidationError as exc:
        problems = [
            _problem(".".join(["stats", *(str(p) for p in err["loc"])]), err["msg"]) for err in exc.errors()
        ]
        raise SiteRecoveryError(problems, Status.UNPROCESSABLE) from None
    return stats


def number(stats: dict[str, Any], key: str) -> float:
    """A stored statistic as a float for display and metrics; 0 for anything that is not a number.

    Reports are validated on the way in; this keeps a row stored by an older server from
    breaking a page or a scrape."""
    value = stats.get(key, 0)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return 0.0
    result = float(value) if abs(value) <= MAX_NUMBER else 0.0
    return result if math.isfinite(result) else 0.0


def entries(stats: dict[str, Any], key: str) -> list[dict[str, Any]]:
    """A stored list-of-objects statistic; the objects of it only (see `number`)."""
    value = stats.get(key)
    return [v for v in value if isinstance(v, dict)] if isinstance(value, list) else []
