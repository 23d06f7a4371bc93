from __future__ import annotations

import uuid
from collections.abc import Sequence

from sqlalchemy import bindparam, func, select
from sqlalchemy.dialects.postgresql import insert

from cloudbot_api.repository import Fields, Query, ReadRepository, Repository
from cloudbot_common.commands import Requested, request_command
from cloudbot_common.lifecycle import Command
from cloudbot_common.models import (
    LIVE_STATES,
    IdempotencyRecord,
    Instance,
    InstanceEvent,
    InstanceState,
    User,
)


class InstanceRepository(Repository):
    async def request(
        self, instance: Instance, command: Command, request_id: str | None
    ) -> Requested:
        """Request `command` for `instance` (a new one is added) the one way the lifecycle
        table says (`request_command`): its state and the outbox command. Raises
        TransitionError when the instance is in a state the command does not start from."""
        requested = await request_command(self.session, instance, command, request_id)
        await self.save(instance)
        return requested

    async def get_owned(
        self, owner_id: uuid.UUID, instance_id: uuid.UUID, *, lock: bool = False
    ) -> Instance | None:
        query = select(Instance).where(Instance.id == instance_id, Instance.owner_id == owner_id)
        if lock:
            query = query.with_for_update()
        result = await self.session.scalars(query)
        return result.one_or_none()

    async def lock_owner(self, owner_id: uuid.UUID) -> None:
        """Serialise one user's creates, so the live-instance quota cannot be raced.

        FOR NO KEY UPDATE, not FOR UPDATE: a create has by then inserted its idempotency
        key, whose foreign key holds a KEY SHARE lock on the same user row; FOR UPDATE
        would wait for the other creates' KEY SHARE locks while they wait for this one's,
        a deadlock as soon as two creates of one user run at once."""
        await self.session.execute(
            select(User.id).where(User.id == owner_id).with_for_update(key_share=True)
        )

    async def count_live(self, owner_id: uuid.UUID) -> int:
        count = await self.session.scalar(
            select(func.count())
            .select_from(Instance)
            .where(Instance.owner_id == owner_id, Instance.state.in_(list(LIVE_STATES)))
        )
        return int(count or 0)

    async def events_after(
        self, instance_id: uuid.UUID, after_id: int, limit: int = 100
    ) -> Sequence[InstanceEvent]:
        result = await self.session.scalars(
            select(InstanceEvent)
            .where(InstanceEvent.instance_id == instance_id, InstanceEvent.id > after_id)
            .order_by(InstanceEvent.id)
            .limit(limit)
        )
        return result.all()

    async def last_event_id(self) -> int:
        return await self.session.scalar(select(func.max(InstanceEvent.id))) or 0

    async def owner_events_after(
        self, owner_id: uuid.UUID, after_id: int, kind: str, limit: int = 100
    ) -> Sequence[InstanceEvent]:
        """Events of one kind, of any of the owner's instances, after `after_id`."""
        result = await self.session.scalars(
            select(InstanceEvent)
            .join(Instance, Instance.id == InstanceEvent.instance_id)
            .where(
                Instance.owner_id == owner_id,
                InstanceEvent.id > after_id,
                InstanceEvent.kind == kind,
            )
            .order_by(InstanceEvent.id)
            .limit(limit)
        )
        return result.all()

    async def claim_idempotency_key(
        self, user_id: uuid.UUID, key: str, request_hash: str
    ) -> IdempotencyRecord | None:
        """Claim `key` for this request. Returns None when claimed, or the earlier record.

        A concurrent request with the same key waits on the unique index until the first
        commits, then sees its record.
        """
        inserted = await self.session.execute(
            insert(IdempotencyRecord)
            .values(user_id=user_id, key=key, request_hash=request_hash, status_code=0, response={})
            .on_conflict_do_nothing()
            .returning(IdempotencyRecord.key)
        )
        if inserted.first() is not None:
            return None
        result = await self.session.scalars(
            select(IdempotencyRecord).where(
                IdempotencyRecord.user_id == user_id, IdempotencyRecord.key == key
            )
        )
        return result.one()

    async def save_idempotent_response(
        self, user_id: uuid.UUID, key: str, status_code: int, response: dict[str, object]
    ) -> None:
        record = await self.session.get(IdempotencyRecord, (user_id, key))
        assert record is not None
        record.status_code = status_code
        record.response = response
        await self.session.flush()


# What users see of an instance (`service.to_out`).
_SHOWN = select(
    Instance.id,
    Instance.name,
    Instance.size,
    Instance.state,
    Instance.state_reason,
    Instance.state_changed_at,
    Instance.last_heartbeat_at,
    Instance.desktop_healthy,
    Instance.agent_healthy,
    Instance.idle_stop_minutes,
    Instance.created_at,
    Instance.updated_at,
)
_OWNED = _SHOWN.where(Instance.owner_id == bindparam("owner_id"))
_LIST_ALL = Query.of(_OWNED.order_by(Instance.created_at.desc()))
_LIST_LIVE = Query.of(
    _OWNED.where(Instance.state != InstanceState.TERMINATED).order_by(Instance.created_at.desc())
)
_ONE = Query.of(_OWNED.where(Instance.id == bindparam("instance_id")))


class InstanceReads(ReadRepository):
    async def list_for_owner(
        self, owner_id: uuid.UUID, *, include_terminated: bool
    ) -> list[Fields]:
        query = _LIST_ALL if include_terminated else _LIST_LIVE
        return await self.all(query, owner_id=owner_id)

    async def get_owned(self, owner_id: uuid.UUID, instance_id: uuid.UUID) -> Fields | None:
        return await self.first(_ONE, owner_id=owner_id, instance_id=instance_id)
