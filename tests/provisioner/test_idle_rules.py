"""Idle stop's rules, as pure functions: when a machine was last in use, and how long
before the stop the warning goes out."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from cloudbot_common.models import Instance
from cloudbot_provisioner.idle import idle_since, warning_lead

pytestmark = pytest.mark.fast

NOW = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)


def machine(**fields: object) -> Instance:
    base = {"state_changed_at": NOW - timedelta(hours=2), "agent_busy": False}
    return Instance(**(base | fields))


def test_a_working_agent_means_in_use_now() -> None:
    assert idle_since(machine(agent_busy=True), None, NOW) == NOW


def test_the_latest_of_running_since_reported_activity_and_gateway_use_counts() -> None:
    reported = NOW - timedelta(minutes=30)
    marked = NOW - timedelta(minutes=10)
    assert idle_since(machine(), None, NOW) == NOW - timedelta(hours=2)
    assert idle_since(machine(last_activity_at=reported), None, NOW) == reported
    assert idle_since(machine(last_activity_at=reported), marked, NOW) == marked
    assert idle_since(machine(last_activity_at=marked), reported, NOW) == marked


@pytest.mark.parametrize(
    ("idle", "warning", "lead"),
    [(60, 5, 5), (8, 5, 4), (1, 5, 0.5), (60, 0, 0)],
)
def test_the_warning_comes_at_most_half_the_idle_time_early(
    idle: int, warning: int, lead: float
) -> None:
    assert warning_lead(idle, warning) == timedelta(minutes=lead)
