"""Instance lifecycle requests: validate, move the state, and stage the command (outbox);
and what the event streams read (`InstanceFeed`)."""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Protocol

from celery import Celery
from redis.asyncio import Redis

from cloudbot_api.audit.service import Auditor
from cloudbot_api.errors import ProblemError
from cloudbot_api.instances.repository import InstanceReads, InstanceRepository
from cloudbot_api.instances.schemas import (
    Health,
    InstanceCreate,
    InstanceOut,
    InstanceUpdate,
    TicketOut,
)
from cloudbot_api.repository import ReadConnections
from cloudbot_api.unit_of_work import UnitOfWork
from cloudbot_common.audit import Action
from cloudbot_common.commands import Requested, publish
from cloudbot_common.db import SessionFactory
from cloudbot_common.events import publish_instance_event
from cloudbot_common.lifecycle import LIFECYCLE, Command, TransitionError
from cloudbot_common.logging import get_logger
from cloudbot_common.models import Instance, InstanceEvent, InstanceState
from cloudbot_common.settings import Settings
from cloudbot_common.tickets import Channel, Ticket, issue_ticket

log = get_logger(__name__)


def not_found() -> ProblemError:
    # The same answer for a missing instance and for somebody else's.
    return ProblemError(404, "instance_not_found", "No such instance.")


def state_conflict(instance: Instance, wanted: str) -> ProblemError:
    return ProblemError(
        409,
        "instance_state_conflict",
        f"The instance is {instance.state}; it cannot {wanted} now.",
        state=instance.state,
    )


class Shown(Protocol):
    """What users see of an instance: an `Instance`, or a row of `InstanceReads`."""

    @property
    def id(self) -> uuid.UUID: ...
    @property
    def name(self) -> str: ...
    @property
    def size(self) -> str: ...
    @property
    def state(self) -> str: ...
    @property
    def state_reason(self) -> str | None: ...
    @property
    def state_changed_at(self) -> datetime: ...
    @property
    def last_heartbeat_at(self) -> datetime | None: ...
    @property
    def desktop_healthy(self) -> bool | None: ...
    @property
    def agent_healthy(self) -> bool | None: ...
    @property
    def idle_stop_minutes(self) -> int: ...
    @property
    def created_at(self) -> datetime: ...
    @property
    def updated_at(self) -> datetime: ...


def to_out(instance: Shown, stale_after: timedelta) -> InstanceOut:
    """The instance as users see it. Health is unknown (null) once the machine has not
    reported for `stale_after`: an old "up" must not pass for a current one."""
    beat = instance.last_heartbeat_at
    fresh = beat is not None and datetime.now(UTC) - beat <= stale_after
    return InstanceOut(
        id=instance.id,
        name=instance.name,
        size=instance.size,
        state=InstanceState(instance.state),
        state_reason=instance.state_reason,
        state_changed_at=instance.state_changed_at,
        health=Health(
            desktop=instance.desktop_healthy if fresh else None,
            agent=instance.agent_healthy if fresh else None,
            last_heartbeat_at=beat,
        ),
        idle_stop_minutes=instance.idle_stop_minutes,
        created_at=instance.created_at,
        updated_at=instance.updated_at,
    )


class InstanceService:
    def __init__(
        self,
        uow: UnitOfWork,
        *,
        settings: Settings,
        redis: Redis,
        celery: Celery,
        sessions: SessionFactory,
        audit: Auditor,
        request_id: str | None,
    ) -> None:
        self.uow = uow
        self.repo = InstanceRepository(uow.session)
        self.settings = settings
        self.redis = redis
        self.celery = celery
        # A session of its own for marking a command published once the request committed.
        self.sessions = sessions
        self.audit = audit
        self.request_id = request_id

    def out(self, instance: Instance) -> InstanceOut:
        return to_out(instance, timedelta(seconds=self.settings.heartbeat_stale_seconds))

    async def create(
        self,
        owner_id: uuid.UUID,
        body: InstanceCreate,
        idempotency_key: str | None,
        *,
        actor: str,
    ) -> tuple[int, dict[str, object]]:
        """Returns (status, body): the first answer again when the key was seen before."""
        if not body.size:
            body = body.model_copy(update={"size": self.settings.default_instance_size})
        instance_type = self.settings.instance_sizes.get(body.size)
        if instance_type is None:
            offered = ", ".join(sorted(self.settings.instance_sizes))
            raise ProblemError(
                422, "unknown_size", f"Unknown size {body.size!r}; offered sizes: {offered}."
            )
        if idempotency_key is not None:
            request_hash = hashlib.sha256(
                json.dumps(body.model_dump(), sort_keys=True).encode()
            ).hexdigest()
            earlier = await self.repo.claim_idempotency_key(owner_id, idempotency_key, request_hash)
            if earlier is not None:
                if earlier.request_hash != request_hash:
                    # 409: the key is bound to another request (the request itself is valid).
                    raise ProblemError(
                        409,
                        "idempotency_key_reused",
                        "This Idempotency-Key was used with a different request.",
                    )
                return earlier.status_code, earlier.response

        await self.repo.lock_owner(owner_id)
        limit = self.settings.max_live_instances_per_user
        if await self.repo.count_live(owner_id) >= limit:
            raise ProblemError(
                403,
                "instance_quota_exceeded",
                f"Your quota is {limit} live instance{'' if limit == 1 else 's'} and you "
                "have reached it; delete one first.",
            )
        instance = Instance(
            id=uuid.uuid4(),
            owner_id=owner_id,
            name=body.name,
            size=body.size,
            instance_type=instance_type,
            backend="local" if self.settings.local_dev_mode else "ec2",
            idle_stop_minutes=(
                body.idle_stop_minutes
                if body.idle_stop_minutes is not None
                else self.settings.idle_stop_minutes
            ),
        )
        requested = await self.repo.request(instance, LIFECYCLE.creates, self.request_id)
        body_out = self.out(instance).model_dump(mode="json")
        if idempotency_key is not None:
            await self.repo.save_idempotent_response(owner_id, idempotency_key, 202, body_out)
        self._after_commit(requested)
        self._audit(owner_id, actor, instance, LIFECYCLE.creates, size=body.size)
        log.info("instance requested", instance_id=str(instance.id), size=body.size)
        return 202, body_out

    async def request(
        self, owner_id: uuid.UUID, instance_id: uuid.UUID, command: Command, *, actor: str
    ) -> Instance:
        """Ask for `command` (stop, start, terminate, ...); what it may start from and the
        state it requests are the lifecycle table's."""
        instance = await self.repo.get_owned(owner_id, instance_id, lock=True)
        if instance is None:
            raise not_found()
        try:
            requested = await self.repo.request(instance, command, self.request_id)
        except TransitionError:
            raise state_conflict(instance, command.verb) from None
        self._after_commit(requested)
        self._audit(owner_id, actor, instance, command)
        log.info("instance command requested", instance_id=str(instance.id), command=command.verb)
        return instance

    async def update(
        self, owner_id: uuid.UUID, instance_id: uuid.UUID, body: InstanceUpdate
    ) -> Instance:
        instance = await self.repo.get_owned(owner_id, instance_id, lock=True)
        if instance is None:
            raise not_found()
        instance.idle_stop_minutes = body.idle_stop_minutes
        instance.idle_warned_at = None  # a new limit re-arms the warning
        await self.repo.save(instance)
        log.info("instance updated", instance_id=str(instance.id), idle_stop=body.idle_stop_minutes)
        return instance

    async def ticket(
        self, owner_id: uuid.UUID, session_id: uuid.UUID, instance_id: uuid.UUID, channel: Channel
    ) -> TicketOut:
        instance = await self.repo.get_owned(owner_id, instance_id)
        if instance is None:
            raise not_found()
        if instance.state != InstanceState.RUNNING:
            raise state_conflict(instance, "be connected to")
        ttl = self.settings.ticket_ttl_seconds
        token = await issue_ticket(
            self.redis,
            Ticket(
                user_id=owner_id, session_id=session_id, instance_id=instance_id, channel=channel
            ),
            ttl_seconds=ttl,
        )
        base = self.settings.public_gateway_url.rstrip("/")
        return TicketOut(
            ticket=token,
            channel=channel,
            expires_in=ttl,
            url=f"{base}/api/instances/{instance_id}/{channel.value}?ticket={token}",
        )

    def _audit(
        self, owner_id: uuid.UUID, actor: str, instance: Instance, command: Command, **details: str
    ) -> None:
        self.audit.record(
            Action.INSTANCE_COMMAND,
            user_id=owner_id,
            actor=actor,
            target=f"instance:{instance.id}",
            command=command.verb,
            **details,
        )

    def _after_commit(self, requested: Requested) -> None:
        async def send() -> None:
            # The outbox row is committed: if this fails, the provisioner's relay sends it.
            await publish(self.celery, self.sessions, requested.command)

        async def announce() -> None:
            await publish_instance_event(self.redis, requested.event)

        self.uow.after_commit(send)
        self.uow.after_commit(announce)


class InstanceQueries:
    """The read-only routes: no unit of work, statements on the read engine."""

    def __init__(self, reads: ReadConnections, *, settings: Settings) -> None:
        self.reads = InstanceReads(reads)
        self.stale_after = timedelta(seconds=settings.heartbeat_stale_seconds)

    async def list(self, owner_id: uuid.UUID, include_terminated: bool) -> list[InstanceOut]:
        rows = await self.reads.list_for_owner(owner_id, include_terminated=include_terminated)
        return [to_out(row, self.stale_after) for row in rows]

    async def get(self, owner_id: uuid.UUID, instance_id: uuid.UUID) -> InstanceOut:
        row = await self.reads.get_owned(owner_id, instance_id)
        if row is None:
            raise not_found()
        return to_out(row, self.stale_after)


class InstanceFeed:
    """What the event streams read. A stream outlives its request, so each read takes a
    short session (or read connection) of its own and none is held while the stream waits."""

    def __init__(
        self, *, sessions: SessionFactory, reads: ReadConnections, settings: Settings
    ) -> None:
        self.sessions = sessions
        self.reads = InstanceReads(reads)
        self.stale_after = timedelta(seconds=settings.heartbeat_stale_seconds)

    async def check_owned(self, owner_id: uuid.UUID, instance_id: uuid.UUID) -> None:
        if await self.reads.get_owned(owner_id, instance_id) is None:
            raise not_found()

    async def history(self, instance_id: uuid.UUID, after: int) -> Sequence[InstanceEvent]:
        """The instance's events after the one with id `after`."""
        async with self.sessions() as session:
            return await InstanceRepository(session).events_after(instance_id, after)

    async def last_event_id(self) -> int:
        async with self.sessions() as session:
            return await InstanceRepository(session).last_event_id()

    async def owner_view(
        self, owner_id: uuid.UUID, warned_after: int
    ) -> tuple[dict[str, dict[str, object]], Sequence[InstanceEvent]]:
        """The owner's instances as `GET /instances` shows them (by id), and the idle
        warnings of their machines after event `warned_after`."""
        rows = await self.reads.list_for_owner(owner_id, include_terminated=False)
        async with self.sessions() as session:
            repo = InstanceRepository(session)
            warnings = await repo.owner_events_after(owner_id, warned_after, "idle_warning")
        shown = {str(r.id): to_out(r, self.stale_after).model_dump(mode="json") for r in rows}
        return shown, warnings
