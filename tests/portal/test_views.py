"""The rules the items table applies: which actions each state offers, how RPO is coloured."""

from __future__ import annotations

import pytest

from siterecovery.control.states import Direction, ProtectionState
from siterecovery.portal.views import ItemAction, RpoLevel, actions_for, rpo_level

F, B = Direction.FORWARD, Direction.FAILBACK
A = ItemAction


@pytest.mark.parametrize(
    ("state", "direction", "expected"),
    [
        pytest.param(ProtectionState.PROTECTED, F, (A.FAILOVER, A.DISABLE), id="fw-2-protected-forward"),
        pytest.param(ProtectionState.PROTECTED, B, (A.FAILBACK, A.DISABLE), id="fb-1-protected-failback"),
        pytest.param(ProtectionState.FAILED_OVER, F, (A.COMMIT, A.DISABLE), id="fw-2-failed-over"),
        pytest.param(ProtectionState.FAILOVER_COMMITTED, F, (A.REPROTECT, A.DISABLE), id="rpw-1-committed"),
        pytest.param(ProtectionState.FAILOVER_COMMITTED, B, (A.REPROTECT, A.DISABLE), id="fb-2-committed"),
        pytest.param(ProtectionState.RESYNC_REQUIRED, F, (A.DISABLE,), id="resync-required"),
        pytest.param(ProtectionState.REPROTECTING, F, (), id="rpw-4-job-running"),
        pytest.param(ProtectionState.FAILOVER_IN_PROGRESS, F, (), id="failover-running"),
        pytest.param(ProtectionState.DISABLED, F, (), id="disabled"),
    ],
)
def test_actions_offered_by_state(
    state: ProtectionState, direction: Direction, expected: tuple[ItemAction, ...]
) -> None:
    assert actions_for(state, direction) == expected


@pytest.mark.parametrize(
    ("rpo", "expected"),
    [
        pytest.param(None, RpoLevel.UNKNOWN, id="not-measured"),
        pytest.param(60.0, RpoLevel.OK, id="within-threshold"),
        pytest.param(900.0, RpoLevel.OK, id="at-threshold"),
        pytest.param(901.0, RpoLevel.WARNING, id="pol-2-over-threshold"),
        pytest.param(1801.0, RpoLevel.CRITICAL, id="pol-2-over-twice"),
    ],
)
def test_rpo_colour_against_policy_threshold(rpo: float | None, expected: RpoLevel) -> None:
    assert rpo_level(rpo, 900) is expected
