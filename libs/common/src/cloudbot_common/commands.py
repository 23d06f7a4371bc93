"""Commands from the control plane to the provisioner, sent through the transactional outbox.

The API writes an `OutboxCommand` row in the same transaction as the state change
(`request_command`), then publishes it after commit. The provisioner's relay republishes
rows that were not completed in time. Task arguments are ids only, never secrets. What the
commands are is declared in `cloudbot_common.lifecycle`.
"""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime

from celery import Celery
from sqlalchemy import update
from sqlalchemy.ext.asyncio import AsyncSession

from cloudbot_common.db import SessionFactory, unit_of_work
from cloudbot_common.events import InstanceStateEvent
from cloudbot_common.lifecycle import Command, begin, request
from cloudbot_common.models import Instance, OutboxCommand
from cloudbot_common.redis_client import redis_timeouts
from cloudbot_common.settings import Settings

PROVISIONING_QUEUE = "provisioning"


def make_celery(settings: Settings, name: str) -> Celery:
    """A Celery app with the settings producers and the worker share."""
    app = Celery(name, broker=settings.broker_url)
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        task_default_queue=PROVISIONING_QUEUE,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        broker_connection_retry_on_startup=True,
        broker_transport_options={
            # Unacknowledged tasks come back after this long if their worker vanished.
            "visibility_timeout": max(settings.outbox_relay_after_seconds * 4, 60),
            **redis_timeouts(settings),
        },
        task_publish_retry_policy={"max_retries": 2, "interval_start": 0.2},
        # Monitoring events, so Flower lists every command from the moment it is queued
        # (the producer's task-sent) through the worker's received/started/succeeded.
        task_send_sent_event=True,
        worker_send_task_events=True,
        enable_utc=True,
    )
    return app


def add_command(
    session: AsyncSession, command: Command, instance_id: uuid.UUID, request_id: str | None
) -> OutboxCommand:
    """Stage a command in the caller's transaction. Publish it with `publish` after commit."""
    row = OutboxCommand(
        id=uuid.uuid4(),
        task=command.task,
        instance_id=instance_id,
        request_id=request_id,
        publish_attempts=0,
    )
    session.add(row)
    return row


@dataclass(frozen=True, slots=True)
class Requested:
    """An accepted request: the event to announce and the command to publish, both once
    the transaction has committed."""

    event: InstanceStateEvent
    command: OutboxCommand


async def request_command(
    session: AsyncSession,
    instance: Instance,
    command: Command,
    request_id: str | None,
    reason: str | None = None,
) -> Requested:
    """Accept a request for `command` in the caller's transaction (the one way a command is
    asked for, see who writes which state in `cloudbot_common.lifecycle`): the instance
    moves to the state the command requests (a new one, added to `session`, starts there)
    and the command is staged in the outbox. The caller holds the row lock; raises
    TransitionError when the instance is in a state the command does not start from."""
    if command.starts_from:
        event = await request(session, instance, command, reason)
    else:
        event = await begin(session, instance, command)
    return Requested(event, add_command(session, command, instance.id, request_id))


def send_command(celery: Celery, row: OutboxCommand) -> None:
    """Put one outbox command on the queue. The task id is the outbox id, so duplicates
    published by the relay are recognisable."""
    celery.send_task(
        row.task,
        kwargs={"instance_id": str(row.instance_id), "command_id": str(row.id)},
        task_id=str(row.id),
        headers={"request_id": row.request_id} if row.request_id else None,
        retry=True,
    )


async def mark_published(session: AsyncSession, command_ids: list[uuid.UUID]) -> None:
    if not command_ids:
        return
    await session.execute(
        update(OutboxCommand)
        .where(OutboxCommand.id.in_(command_ids))
        .values(
            published_at=datetime.now(UTC),
            publish_attempts=OutboxCommand.publish_attempts + 1,
        )
    )


async def publish(celery: Celery, sessions: SessionFactory, row: OutboxCommand) -> None:
    """Send a committed command now and record that it went. If this raises, the row
    stays unpublished and the outbox relay sends it later."""
    await asyncio.to_thread(send_command, celery, row)
    async with unit_of_work(sessions) as session:
        await mark_published(session, [row.id])
