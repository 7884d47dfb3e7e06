"""Domain errors with stable codes.

Every rule in REQUIREMENTS.md that can refuse an operation maps to one error code (the rule's ID in
lower-kebab form). An error carries a one-sentence message naming the object at fault and a
remediation sentence. The API turns these into `application/problem+json` at the boundary only.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import IntEnum


class Status(IntEnum):
    BAD_REQUEST = 400
    UNAUTHORIZED = 401
    FORBIDDEN = 403
    NOT_FOUND = 404
    CONFLICT = 409
    UNPROCESSABLE = 422
    UNAVAILABLE = 503


@dataclass(frozen=True)
class Problem:
    """One failed rule or refused request: what, about which object, and how to fix it."""

    code: str
    message: str
    remediation: str
    rule: str | None = None
    detail: dict[str, object] = field(default_factory=dict)

    def as_dict(self) -> dict[str, object]:
        out: dict[str, object] = {
            "code": self.code,
            "message": self.message,
            "remediation": self.remediation,
        }
        if self.rule:
            out["rule"] = self.rule
        if self.detail:
            out["detail"] = dict(self.detail)
        return out


class SiteRecoveryError(Exception):
    """An operation refused with one or more problems, before anything was changed."""

    def __init__(self, problems: Problem | Iterable[Problem], status: Status = Status.CONFLICT) -> None:
        self.problems: tuple[Problem, ...] = (problems,) if isinstance(problems, Problem) else tuple(problems)
        if not self.problems:
            raise ValueError("SiteRecoveryError needs at least one problem")
        self.status = status
        super().__init__("; ".join(f"{p.code}: {p.message}" for p in self.problems))

    @property
    def first(self) -> Problem:
        return self.problems[0]


def not_found(kind: str, ident: object) -> SiteRecoveryError:
    return SiteRecoveryError(
        Problem(
            code="not-found",
            message=f"No {kind} with id or name {ident!r} exists.",
            remediation=f"List the {kind}s and use one of their ids.",
        ),
        Status.NOT_FOUND,
    )


def invalid(field_name: str, message: str, remediation: str) -> SiteRecoveryError:
    return SiteRecoveryError(
        Problem(code="invalid-input", message=message, remediation=remediation, detail={"field": field_name}),
        Status.UNPROCESSABLE,
    )


def conflict(code: str, message: str, remediation: str, rule: str | None = None) -> SiteRecoveryError:
    return SiteRecoveryError(Problem(code, message, remediation, rule), Status.CONFLICT)


# ---- data-plane outcomes that end a DR job (stable codes the runbook names) -----------------


def drain_timeout(machine: str, behind: dict[str, tuple[int, int]], timeout: float) -> SiteRecoveryError:
    """A planned failover's drain did not finish: `behind` maps pair -> (applied, wanted) sequence."""
    pairs = ", ".join(f"{p} (applied {a}, needs {w})" for p, (a, w) in sorted(behind.items()))
    return SiteRecoveryError(
        Problem(
            code="drain-timeout",
            message=f"Replication of {machine} did not drain within {timeout:.0f} s: the master target "
            f"has not applied every acknowledged write of pair {pairs}.",
            remediation="Wait for the pair's alert to clear (`items show`, `alerts list`) and run the "
            "planned failover again, or run an unplanned failover to the latest point now (it "
            "recovers what the master target has applied).",
            detail={"pairs": sorted(behind)},
        )
    )


def recovery_verdict_failed(machine: str, site: str, reason: str) -> SiteRecoveryError:
    """The recovered guest's own consistency check (the oracle) failed after it booted."""
    return SiteRecoveryError(
        Problem(
            code="recovery-verdict-failed",
            message=f"{machine} booted at {site} but its guest check failed: {reason}.",
            remediation="Do not commit: change the recovery point to an older one "
            f"(`items change-point {machine} --point P`) and check again, or inspect the machine.",
            detail={"reason": reason},
        )
    )


def recovery_point_unusable(point: str, pair: str, reason: str, damaged_seq: int = -1) -> SiteRecoveryError:
    """A listed point whose journal records are damaged (or that misses a refused write)."""
    return SiteRecoveryError(
        Problem(
            code="recovery-point-unusable",
            message=f"Recovery point {point!r} of pair {pair!r} cannot be restored: {reason}.",
            remediation="Choose another recovery point (`points list` marks the unusable ones), "
            "or fail over to the latest point.",
            detail={"point": point, "pair": pair, "damaged_seq": damaged_seq},
        )
    )
