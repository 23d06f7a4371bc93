"""Idle stop: a running machine nobody uses is stopped, through the normal command path
(state `stopping` with reason "idle", a stop command in the outbox), after its
`idle_stop_minutes` (0: never).

A machine is in use while anyone has a desktop or agent session open through the gateway
(the gateway's marks), while its agent says it is working on a task, and until the
minutes have passed since the last of: those, the last activity the machine reported
(agent work, desktop input) and the moment it became running. An `idle_warning` event
(on the SSE stream and to webhooks) goes out IDLE_WARNING_MINUTES before the stop (at
most half the idle time); any activity afterwards resets the clock and re-arms it.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import select

from cloudbot_common import activity, webhooks
from cloudbot_common.audit import SYSTEM, Action, Origin, record
from cloudbot_common.commands import publish, request_command
from cloudbot_common.db import unit_of_work
from cloudbot_common.events import InstanceStateEvent
from cloudbot_common.lifecycle import STOP, lock_instance
from cloudbot_common.logging import get_logger
from cloudbot_common.models import Instance, InstanceEvent, InstanceState, OutboxCommand
from cloudbot_provisioner.runtime import Runtime

log = get_logger(__name__)

IDLE_REASON = "idle"


@dataclass(frozen=True, slots=True)
class Sweep:
    warned: int = 0
    stopped: int = 0


def idle_since(instance: Instance, marked: datetime | None, now: datetime) -> datetime:
    """When the machine was last in use (now, if its agent is working)."""
    if instance.agent_busy:
        return now
    moments = [instance.state_changed_at, instance.last_activity_at, marked]
    return max(m for m in moments if m is not None)


def warning_lead(idle_minutes: int, warning_minutes: int) -> timedelta:
    return timedelta(minutes=min(float(warning_minutes), idle_minutes / 2))


async def sweep(rt: Runtime) -> Sweep:
    now = datetime.now(UTC)
    async with unit_of_work(rt.sessions) as session:
        candidates = (
            await session.scalars(
                select(Instance).where(
                    Instance.state == InstanceState.RUNNING.value,
                    Instance.idle_stop_minutes > 0,
                )
            )
        ).all()
    if not candidates:
        return Sweep()
    marks = await activity.last_used(rt.redis, [i.id for i in candidates])
    warned = stopped = 0
    for candidate in candidates:
        since = idle_since(candidate, marks.get(candidate.id), now)
        limit = timedelta(minutes=candidate.idle_stop_minutes)
        stops_at = since + limit
        if now >= stops_at:
            stopped += await _stop(rt, candidate.id, since)
        elif now >= stops_at - warning_lead(
            candidate.idle_stop_minutes, rt.settings.idle_warning_minutes
        ) and (candidate.idle_warned_at is None or candidate.idle_warned_at < since):
            warned += await _warn(rt, candidate.id, since, stops_at)
    if warned or stopped:
        log.info("idle sweep acted", warned=warned, stopped=stopped)
    return Sweep(warned, stopped)


def _still_idle(instance: Instance | None, since: datetime) -> bool:
    """The row, locked now, still says what the sweep read (nothing happened since)."""
    return (
        instance is not None
        and instance.state == InstanceState.RUNNING.value
        and not instance.agent_busy
        and (instance.last_activity_at is None or instance.last_activity_at <= since)
    )


async def _stop(rt: Runtime, instance_id: uuid.UUID, since: datetime) -> int:
    events: list[InstanceStateEvent] = []
    command: OutboxCommand | None = None
    async with unit_of_work(rt.sessions) as session:
        instance = await lock_instance(session, instance_id)
        # A session may have opened since the sweep read the marks: look once more.
        marked = (await activity.last_used(rt.redis, [instance_id])).get(instance_id)
        if (
            instance is None
            or not _still_idle(instance, since)
            or (marked is not None and marked > since)
            or instance.state not in STOP.starts_from
        ):
            return 0
        requested = await request_command(session, instance, STOP, None, reason=IDLE_REASON)
        events.append(requested.event)
        command = requested.command
        record(
            session,
            Action.INSTANCE_COMMAND,
            user_id=instance.owner_id,
            actor=SYSTEM,
            origin=Origin(),
            target=f"instance:{instance.id}",
            command=STOP.verb,
            reason=IDLE_REASON,
            idle_since=since.isoformat(),
        )
    log.info("machine stopped for being idle", instance_id=str(instance_id))
    await rt.publish(events)
    try:
        await publish(rt.celery, rt.sessions, command)
    except Exception:
        log.warning("idle stop not published now; the outbox relay will", exc_info=True)
    return 1


async def _warn(rt: Runtime, instance_id: uuid.UUID, since: datetime, stops_at: datetime) -> int:
    async with unit_of_work(rt.sessions) as session:
        instance = await lock_instance(session, instance_id)
        if instance is None or not _still_idle(instance, since):
            return 0
        entry = InstanceEvent(
            instance_id=instance.id,
            state=instance.state,
            reason=f"Idle; stops at {stops_at.isoformat(timespec='seconds')} unless used.",
            kind="idle_warning",
        )
        session.add(entry)
        await session.flush()
        await webhooks.enqueue(
            session, instance, entry, webhooks.IDLE_WARNING, stops_at=stops_at.isoformat()
        )
        instance.idle_warned_at = datetime.now(UTC)
        event = InstanceStateEvent(
            event_id=entry.id,
            instance_id=str(instance.id),
            owner_id=str(instance.owner_id),
            state=instance.state,
            reason=entry.reason,
        )
    await rt.publish([event])
    return 1
