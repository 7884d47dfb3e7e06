"""The rules the items table applies: which actions each state offers, how RPO is coloured."""

from __future__ import annotations

import pytest

from siterecovery.portal.views import ItemAction, RpoLevel, actions_for, rpo_level
from siterecovery.store.states import Direction, ProtectionState

F, B = Direction.FORWARD, Direction.FAILBACK
A = ItemAction


@pytest.mark.parametrize(
    ("state", "direction", "has_test", "expected"),
    [
        pytest.param(
            ProtectionState.PROTECTED, F, False, (A.FAILOVER, A.TEST_FAILOVER, A.DISABLE), id="fw-2-protected"
        ),
        pytest.param(
            ProtectionState.PROTECTED, B, False, (A.FAILBACK, A.TEST_FAILOVER, A.DISABLE), id="fb-1-protected"
        ),
        pytest.param(
            ProtectionState.PROTECTED,
            F,
            True,
            (A.FAILOVER, A.TEST_CLEANUP, A.DISABLE),
            id="fw-2-test-running",
        ),
        pytest.param(
            ProtectionState.FAILED_OVER,
            F,
            False,
            (A.CHANGE_POINT, A.COMMIT, A.DISABLE),
            id="fw-2-failed-over",
        ),
        pytest.param(
            ProtectionState.FAILOVER_COMMITTED, F, False, (A.REPROTECT, A.DISABLE), id="rpw-1-committed"
        ),
        pytest.param(
            ProtectionState.FAILOVER_COMMITTED, B, False, (A.REPROTECT, A.DISABLE), id="fb-2-committed"
        ),
        pytest.param(ProtectionState.RESYNC_REQUIRED, F, False, (A.DISABLE,), id="resync-required"),
        pytest.param(ProtectionState.REPROTECTING, F, False, (), id="rpw-4-job-running"),
        pytest.param(ProtectionState.FAILOVER_IN_PROGRESS, F, False, (), id="failover-running"),
        pytest.param(ProtectionState.DISABLED, F, False, (), id="disabled"),
    ],
)
def test_actions_offered_by_state(
    state: ProtectionState, direction: Direction, has_test: bool, expected: tuple[ItemAction, ...]
) -> None:
    assert actions_for(state, direction, has_test) == expected


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
