"""The instance state graph as DESIGN.md draws it, as the lifecycle table yields it: every
allowed move, and no other."""

from __future__ import annotations

import itertools

import pytest

from cloudbot_common.lifecycle import can_move
from cloudbot_common.models import InstanceState as S

pytestmark = pytest.mark.fast

_LIVE = {S.PENDING, S.PROVISIONING, S.RUNNING, S.STOPPING, S.STOPPED, S.STARTING}
ALLOWED = {
    (S.PENDING, S.PROVISIONING),
    (S.PROVISIONING, S.RUNNING),
    (S.RUNNING, S.STOPPING),
    (S.STOPPING, S.STOPPED),
    (S.STOPPED, S.STARTING),
    (S.STARTING, S.RUNNING),
    # Any live state, and a failed one, may be terminated; terminating ends.
    *((state, S.TERMINATING) for state in _LIVE | {S.FAILED}),
    (S.TERMINATING, S.TERMINATED),
    # Any state but terminated may fail.
    *((state, S.FAILED) for state in S if state is not S.TERMINATED),
}


@pytest.mark.parametrize(("current", "new"), list(itertools.product(S, S)))
def test_exactly_the_designed_moves_are_allowed(current, new):
    assert can_move(current, new) == ((current, new) in ALLOWED)


def test_moves_accept_the_stored_strings():
    assert can_move("running", "stopping")
    assert not can_move("terminated", "running")
