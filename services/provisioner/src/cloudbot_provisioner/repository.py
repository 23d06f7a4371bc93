"""The provisioner's SQL: outbox bookkeeping and the instance reads of the reconciler.

Functions only flush; whoever opened the unit of work commits.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

from sqlalchemy import exists, func, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from cloudbot_common.lifecycle import LIFECYCLE
from cloudbot_common.models import Instance, InstanceState, OutboxCommand


async def command_completed(session: AsyncSession, command_id: uuid.UUID) -> bool:
    completed_at = await session.scalar(
        select(OutboxCommand.completed_at).where(OutboxCommand.id == command_id)
    )
    return completed_at is not None


async def complete_command(session: AsyncSession, command_id: uuid.UUID) -> None:
    await session.execute(
        update(OutboxCommand)
        .where(OutboxCommand.id == command_id, OutboxCommand.completed_at.is_(None))
        .values(completed_at=func.now())
    )


async def record_failed_attempt(session: AsyncSession, command_id: uuid.UUID) -> int:
    """Count one failed attempt at the command; returns how many there have been."""
    count = await session.scalar(
        update(OutboxCommand)
        .where(OutboxCommand.id == command_id)
        .values(failed_attempts=OutboxCommand.failed_attempts + 1)
        .returning(OutboxCommand.failed_attempts)
    )
    return int(count or 1)


async def command_requeued(
    session: AsyncSession, command_id: uuid.UUID, due_in_seconds: float
) -> None:
    """Record that the command is back on the queue, due in `due_in_seconds`.

    `published_at` is set to when that message becomes deliverable, so the relay leaves
    the command alone while a retry or a wait for the machine is pending, and only
    republishes it if that message is lost (a worker killed while holding it).
    """
    await session.execute(
        update(OutboxCommand)
        .where(OutboxCommand.id == command_id, OutboxCommand.completed_at.is_(None))
        .values(
            published_at=datetime.now(UTC) + timedelta(seconds=due_in_seconds),
            publish_attempts=OutboxCommand.publish_attempts + 1,
        )
    )


async def due_commands(
    session: AsyncSession, older_than: datetime, limit: int
) -> Sequence[OutboxCommand]:
    """Unfinished commands not (re)published since `older_than`, locked for this relay
    run; rows another relay run holds are skipped, not waited for."""
    last_sent = func.coalesce(OutboxCommand.published_at, OutboxCommand.created_at)
    result = await session.scalars(
        select(OutboxCommand)
        .where(OutboxCommand.completed_at.is_(None), last_sent < older_than)
        .order_by(OutboxCommand.created_at)
        .limit(limit)
        .with_for_update(skip_locked=True)
    )
    return result.all()


async def open_command_exists(session: AsyncSession, instance_id: uuid.UUID) -> bool:
    return bool(
        await session.scalar(
            select(
                exists().where(
                    OutboxCommand.instance_id == instance_id,
                    OutboxCommand.completed_at.is_(None),
                )
            )
        )
    )


async def instances_on_backend(session: AsyncSession, backend: str) -> Sequence[Instance]:
    """Every instance of this backend that is not terminated: what the reconciler checks
    machines against."""
    result = await session.scalars(
        select(Instance).where(
            Instance.backend == backend, Instance.state != InstanceState.TERMINATED
        )
    )
    return result.all()


async def stuck_instances(
    session: AsyncSession, backend: str, changed_before: datetime
) -> Sequence[Instance]:
    result = await session.scalars(
        select(Instance).where(
            Instance.backend == backend,
            Instance.state.in_([s.value for s in LIFECYCLE.transitional]),
            Instance.state_changed_at < changed_before,
        )
    )
    return result.all()
