"""State and session events on Redis pub/sub.

Postgres holds the truth (instance rows, the state history); these messages only tell
listeners (SSE streams, gateway sessions, ownership caches) to look again or to close.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from redis.asyncio import Redis

from cloudbot_common.logging import get_logger

_log = get_logger(__name__)

INSTANCE_EVENTS_CHANNEL = "cloudbot:events:instances"
SESSION_EVENTS_CHANNEL = "cloudbot:events:sessions"
# "An instance's health changed": {"instance_id": ..., "owner_id": ...}, nothing more.
HEALTH_EVENTS_CHANNEL = "cloudbot:events:health"
_REVOKED_SESSION_KEY = "cloudbot:revoked-session:{}"


@dataclass(frozen=True, slots=True)
class InstanceStateEvent:
    event_id: int
    instance_id: str
    owner_id: str
    state: str
    reason: str | None = None

    def encode(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def decode(cls, raw: str | bytes) -> InstanceStateEvent:
        return cls(**json.loads(raw))


async def publish_instance_event(redis: Redis, event: InstanceStateEvent) -> None:
    await redis.publish(INSTANCE_EVENTS_CHANNEL, event.encode())


async def publish_health_changed(redis: Redis, instance_id: uuid.UUID, owner_id: uuid.UUID) -> None:
    """Tell listeners that an instance reported a different health (they read it again)."""
    message = {"instance_id": str(instance_id), "owner_id": str(owner_id)}
    await redis.publish(HEALTH_EVENTS_CHANNEL, json.dumps(message))


def revoked_session_key(session_id: uuid.UUID | str) -> str:
    """The Redis key that marks a login session revoked (exists while it matters)."""
    return _REVOKED_SESSION_KEY.format(session_id)


async def revoke_login_session(
    redis: Redis, session_id: uuid.UUID, *, remember_seconds: int
) -> None:
    """Mark a login session revoked for as long as its access tokens can live, and say so."""
    await redis.set(revoked_session_key(session_id), "1", ex=max(remember_seconds, 1))
    await redis.publish(SESSION_EVENTS_CHANNEL, json.dumps({"session_id": str(session_id)}))


class EventHub:
    """One Redis subscription per process, fanned out to local waiters.

    SSE streams and gateway sessions register callbacks here instead of each holding a
    Redis connection of its own.
    """

    def __init__(self, redis: Redis) -> None:
        self._redis = redis
        self._instance_listeners: dict[str, set[Callable[[InstanceStateEvent], None]]] = {}
        self._session_listeners: dict[str, set[Callable[[], None]]] = {}
        self._any_instance: set[Callable[[InstanceStateEvent], None]] = set()
        self._owner_listeners: dict[str, set[Callable[[], None]]] = {}
        self._task: asyncio.Task[None] | None = None
        self.ready = asyncio.Event()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="event-hub")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def on_instance(
        self, instance_id: str | None, callback: Callable[[InstanceStateEvent], None]
    ) -> Callable[[], None]:
        """Call `callback` for each state event of `instance_id` (None: of any instance).
        Returns the function that unsubscribes."""
        if instance_id is None:
            self._any_instance.add(callback)
            return lambda: self._any_instance.discard(callback)
        listeners = self._instance_listeners.setdefault(instance_id, set())
        listeners.add(callback)
        return lambda: self._discard(self._instance_listeners, instance_id, callback)

    def on_owner(self, owner_id: str, callback: Callable[[], None]) -> Callable[[], None]:
        """Call `callback` whenever any instance of `owner_id` changes state or health.
        Returns the function that unsubscribes."""
        listeners = self._owner_listeners.setdefault(owner_id, set())
        listeners.add(callback)
        return lambda: self._discard(self._owner_listeners, owner_id, callback)

    def on_session_revoked(
        self, session_id: str, callback: Callable[[], None]
    ) -> Callable[[], None]:
        listeners = self._session_listeners.setdefault(session_id, set())
        listeners.add(callback)
        return lambda: self._discard(self._session_listeners, session_id, callback)

    def session_revoked(self, session_id: str) -> None:
        """Tell the listeners of `session_id` that it ended, as its event would."""
        for revoked in list(self._session_listeners.get(session_id, ())):
            revoked()

    @staticmethod
    def _discard(table: dict[str, set[Any]], key: str, callback: Any) -> None:
        listeners = table.get(key)
        if listeners is not None:
            listeners.discard(callback)
            if not listeners:
                del table[key]

    async def _run(self) -> None:
        while True:
            try:
                async with self._redis.pubsub() as pubsub:
                    await pubsub.subscribe(
                        INSTANCE_EVENTS_CHANNEL, SESSION_EVENTS_CHANNEL, HEALTH_EVENTS_CHANNEL
                    )
                    self.ready.set()
                    while True:
                        # Polled with a timeout of our own: `listen()` would read under the
                        # client's socket_timeout and drop the subscription whenever the
                        # channels are quiet for that long.
                        message = await pubsub.get_message(timeout=1.0)
                        if message is not None and message.get("type") == "message":
                            self._dispatch(message["channel"], message["data"])
            except asyncio.CancelledError:
                raise
            except Exception:
                # Listeners fall back on their own checks meanwhile; resubscribe shortly.
                self.ready.clear()
                _log.warning("event subscription lost; reconnecting", exc_info=True)
                await asyncio.sleep(1)

    def _dispatch(self, channel: str | bytes, data: str | bytes) -> None:
        channel = channel.decode() if isinstance(channel, bytes) else channel
        try:
            if channel == INSTANCE_EVENTS_CHANNEL:
                event = InstanceStateEvent.decode(data)
                callbacks = [
                    *self._instance_listeners.get(event.instance_id, ()),
                    *self._any_instance,
                ]
                for cb in callbacks:
                    cb(event)
                self._tell_owner(event.owner_id)
            elif channel == HEALTH_EVENTS_CHANNEL:
                self._tell_owner(json.loads(data)["owner_id"])
            elif channel == SESSION_EVENTS_CHANNEL:
                self.session_revoked(json.loads(data)["session_id"])
        except Exception:
            _log.warning("bad event message ignored", channel=channel, exc_info=True)

    def _tell_owner(self, owner_id: str) -> None:
        for changed in list(self._owner_listeners.get(owner_id, ())):
            changed()
