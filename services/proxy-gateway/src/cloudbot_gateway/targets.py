"""Where a session goes: the owner's instance row, looked up server-side and cached in Redis.

The cache is shared by every gateway replica. A state event overwrites an instance's entry
with what the event says (owner and new state, but no address), so a stop is seen at once
without a database read. A lookup that has to read Postgres writes back what it read.

Every entry carries the id of the instance's latest state event it reflects ("e"; the
ids of one instance's events grow in commit order, as its transitions hold the row lock),
and a write never replaces a newer entry: not when a database read raced a state change,
nor when replicas write the same events in different orders, each a little late. The TTL
bounds staleness should events be missed while the subscription is down.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Collection
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

from redis.asyncio import Redis
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from cloudbot_common.events import InstanceStateEvent
from cloudbot_common.logging import get_logger
from cloudbot_common.models import Instance, InstanceEvent, InstanceState
from cloudbot_gateway.refusals import Refusal, not_found

_log = get_logger(__name__)

_KEY = "cloudbot:gateway:target:{}"
CACHE_TTL_SECONDS = 60
_RUNNING = InstanceState.RUNNING.value

# Set KEYS[1] to ARGV[1], whose event id is ARGV[2], unless the entry there is newer:
# its event id is greater, or equal and ARGV[3] is "0" (an event adds nothing to the same
# state read from the database, which has the address too).
_NEWER = """
local current = redis.call('GET', KEYS[1])
if current then
  local stored = tonumber(cjson.decode(current)['e']) or -1
  local new = tonumber(ARGV[2])
  if stored > new or (stored == new and ARGV[3] == '0') then
    return 0
  end
end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[4])
return 1
"""


@dataclass(frozen=True, slots=True)
class Target:
    host: str | None
    vnc_port: int | None
    agent_port: int | None


def _not_running(state: str) -> Refusal:
    return Refusal(
        HTTPStatus.CONFLICT, "instance_not_running", f"The instance is {state}.", state=state
    )


class TargetDirectory:
    def __init__(self, engine: AsyncEngine, redis: Redis, ttl_seconds: int = CACHE_TTL_SECONDS):
        self._engine = engine
        self._redis = redis
        self._ttl = ttl_seconds
        self._write_if_newer = redis.register_script(_NEWER)
        self._pending: set[asyncio.Task[Any]] = set()

    async def resolve(self, instance_id: uuid.UUID, user_id: uuid.UUID) -> Target:
        """The running instance `instance_id` of `user_id`, or a refusal: 404 when it does not
        exist or belongs to someone else (the same answer), 409 when it is not running."""
        key = _KEY.format(instance_id)
        cached = await self._redis.get(key)
        if cached is not None:
            entry = json.loads(cached)
            if entry["o"] != str(user_id):
                raise not_found()
            if entry["s"] != _RUNNING:
                raise _not_running(entry["s"])
            if "h" in entry:
                return Target(entry["h"], entry["v"], entry["a"])
        latest_event = (
            select(func.coalesce(func.max(InstanceEvent.id), 0))
            .where(InstanceEvent.instance_id == Instance.id)
            .scalar_subquery()
        )
        async with self._engine.connect() as conn:
            result = await conn.execute(
                select(
                    Instance.owner_id,
                    Instance.state,
                    Instance.host,
                    Instance.vnc_port,
                    Instance.agent_port,
                    latest_event,
                ).where(Instance.id == instance_id)
            )
            row = result.one_or_none()
        if row is None:
            raise not_found()
        owner_id, state, host, vnc_port, agent_port, event_id = row
        entry = {
            "o": str(owner_id),
            "s": state,
            "h": host,
            "v": vnc_port,
            "a": agent_port,
            "e": event_id,
        }
        await self._write(key, entry, replaces_same_event=True)
        if owner_id != user_id:
            raise not_found()
        if state != _RUNNING:
            raise _not_running(state)
        return Target(host, vnc_port, agent_port)

    async def states(self, instance_ids: Collection[uuid.UUID]) -> dict[uuid.UUID, str]:
        """The current state of each instance, read from Postgres (the truth, not the
        cache, which only events update). Deleted rows are absent."""
        if not instance_ids:
            return {}
        async with self._engine.connect() as conn:
            rows = await conn.execute(
                select(Instance.id, Instance.state).where(Instance.id.in_(list(instance_ids)))
            )
            return {row.id: row.state for row in rows}

    def on_state_event(self, event: InstanceStateEvent) -> None:
        """EventHub callback for every instance: record the new state in the shared cache."""
        entry = {"o": event.owner_id, "s": event.state, "e": event.event_id}
        task = asyncio.create_task(
            self._write(_KEY.format(event.instance_id), entry, replaces_same_event=False)
        )
        self._pending.add(task)
        task.add_done_callback(self._written)

    async def _write(self, key: str, entry: dict[str, Any], *, replaces_same_event: bool) -> None:
        args = [json.dumps(entry), entry["e"], int(replaces_same_event), self._ttl]
        await self._write_if_newer(keys=[key], args=args)

    def _written(self, task: asyncio.Task[Any]) -> None:
        self._pending.discard(task)
        if not task.cancelled() and task.exception() is not None:
            # The TTL still bounds how long the old entry can be believed.
            _log.warning("target cache update failed", error=type(task.exception()).__name__)

    async def aclose(self) -> None:
        if self._pending:
            await asyncio.wait(self._pending, timeout=2)
