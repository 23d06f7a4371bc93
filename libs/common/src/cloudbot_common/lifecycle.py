"""The instance state machine: which moves are allowed, and the one way to make a move.

Every state change goes through `transition`, which writes the row and its history entry
in the caller's transaction and hands back the event to publish once that commits.
"""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from cloudbot_common import webhooks
from cloudbot_common.events import InstanceStateEvent
from cloudbot_common.models import Instance, InstanceEvent
from cloudbot_common.models import InstanceState as S

# Allowed moves. `failed` is reachable from every state and handled in `can_move`.
_MOVES: dict[S, frozenset[S]] = {
    S.PENDING: frozenset({S.PROVISIONING, S.RUNNING, S.TERMINATING}),
    S.PROVISIONING: frozenset({S.RUNNING, S.TERMINATING}),
    S.RUNNING: frozenset({S.STOPPING, S.TERMINATING}),
    S.STOPPING: frozenset({S.STOPPED, S.TERMINATING}),
    S.STOPPED: frozenset({S.STARTING, S.TERMINATING}),
    S.STARTING: frozenset({S.RUNNING, S.TERMINATING}),
    S.TERMINATING: frozenset({S.TERMINATED}),
    S.TERMINATED: frozenset(),
    S.FAILED: frozenset({S.TERMINATING}),
}


def can_move(current: S | str, new: S | str) -> bool:
    current, new = S(current), S(new)
    if new is S.FAILED:
        return current is not S.TERMINATED
    return new in _MOVES[current]


class TransitionError(Exception):
    def __init__(self, current: str, new: str) -> None:
        super().__init__(f"cannot move from {current} to {new}")
        self.current = current
        self.new = new


async def lock_instance(session: AsyncSession, instance_id: object) -> Instance | None:
    """The instance row, locked for this transaction (state guards depend on it)."""
    result = await session.scalars(
        select(Instance).where(Instance.id == instance_id).with_for_update()
    )
    return result.one_or_none()


async def transition(
    session: AsyncSession,
    instance: Instance,
    new: S,
    reason: str | None = None,
) -> InstanceStateEvent:
    """Move `instance` to `new`, recording history. The caller holds the row lock and
    commits; publish the returned event after the commit."""
    if not can_move(instance.state, new):
        raise TransitionError(instance.state, new.value)
    now = datetime.now(UTC)
    instance.state = new.value
    instance.state_reason = reason
    instance.state_changed_at = now
    if new in (S.STOPPED, S.TERMINATED, S.FAILED):
        instance.desktop_healthy = None
        instance.agent_healthy = None
    return await _record(session, instance, reason)


async def record_initial_state(session: AsyncSession, instance: Instance) -> InstanceStateEvent:
    """History entry for a newly created instance (its first state)."""
    return await _record(session, instance, None)


async def _record(
    session: AsyncSession, instance: Instance, reason: str | None
) -> InstanceStateEvent:
    entry = InstanceEvent(instance_id=instance.id, state=instance.state, reason=reason)
    session.add(entry)
    await session.flush()
    # Owed to the owner's webhooks, in the same transaction as the change (an outbox).
    await webhooks.enqueue(session, instance, entry, webhooks.STATE_CHANGED)
    return InstanceStateEvent(
        event_id=entry.id,
        instance_id=str(instance.id),
        owner_id=str(instance.owner_id),
        state=instance.state,
        reason=reason,
    )
