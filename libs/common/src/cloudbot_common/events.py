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
from redis.asyncio.client import PubSub

from cloudbot_common.logging import get_logger

_log = get_logger(__name__)

# How long a barrier (`EventHub.caught_up`) may wait for its answer before its callers are
# told that nothing is known and the subscription is made again.
BARRIER_TIMEOUT_SECONDS = 1.0
_BARRIER = "cloudbot-barrier:"

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


def revoked_session_pattern() -> str:
    """A SCAN pattern matching every revoked-session marker."""
    return _REVOKED_SESSION_KEY.format("*")


async def revoke_login_session(
    redis: Redis, session_id: uuid.UUID, *, remember_seconds: int
) -> None:
    """Mark a login session revoked for as long as its access tokens can live, and say so.

    Both or neither (one transaction): processes that keep revocations in memory learn them
    only from the message, and ones that ask Redis only from the marker."""
    async with redis.pipeline(transaction=True) as pipe:
        pipe.set(revoked_session_key(session_id), "1", ex=max(remember_seconds, 1))
        pipe.publish(SESSION_EVENTS_CHANNEL, json.dumps({"session_id": str(session_id)}))
        await pipe.execute()


class EventHub:
    """One Redis subscription per process, fanned out to local waiters.

    SSE streams and gateway sessions register callbacks here instead of each holding a
    Redis connection of its own.

    `generation` counts the subscription's lives: it changes whenever the subscription is
    made (again, after redis-py reconnected it) or lost, so that a listener keeping state
    from the messages knows when messages may have been missed (see `on_subscribed`).
    """

    def __init__(self, redis: Redis) -> None:
        self._redis = redis
        self._instance_listeners: dict[str, set[Callable[[InstanceStateEvent], None]]] = {}
        self._session_listeners: dict[str, set[Callable[[], None]]] = {}
        self._any_session: set[Callable[[str], None]] = set()
        self._subscribed: set[Callable[[], None]] = set()
        self._any_instance: set[Callable[[InstanceStateEvent], None]] = set()
        self._owner_listeners: dict[str, set[Callable[[], None]]] = {}
        self._task: asyncio.Task[None] | None = None
        self.ready = asyncio.Event()
        self.generation = 0
        self._pubsub: PubSub | None = None
        # Barriers: at most one PING in flight (its token, its waiters' future, its
        # deadline); callers arriving meanwhile share the next one.
        self._barrier_sent: tuple[str, asyncio.Future[bool], asyncio.TimerHandle] | None = None
        self._barrier_next: asyncio.Future[bool] | None = None
        self._barriers = 0
        self._pings: set[asyncio.Task[None]] = set()

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

    def on_any_session_revoked(self, callback: Callable[[str], None]) -> None:
        """Call `callback(session_id)` for every session revoked, for as long as we run."""
        self._any_session.add(callback)

    def on_subscribed(self, callback: Callable[[], None]) -> None:
        """Call `callback` each time the subscription is made (again): from then on every
        message is seen, but those published before may have been missed."""
        self._subscribed.add(callback)

    def session_revoked(self, session_id: str) -> None:
        """Tell the listeners of `session_id` that it ended, as its event would."""
        for heard in list(self._any_session):
            heard(session_id)
        for revoked in list(self._session_listeners.get(session_id, ())):
            revoked()

    async def caught_up(self) -> bool:
        """Whether every message published before this call has now been dispatched here.

        A PING on the subscription's own connection is answered in order with the messages:
        once its answer is read, every message Redis took before the PING has been handled.
        One PING is in flight at a time, and callers arriving meanwhile share the next, so
        under load one round trip serves many requests. False (know nothing) when there is
        no subscription, when it was made again or lost meanwhile, or when no answer came
        within BARRIER_TIMEOUT_SECONDS (the subscription is then made again)."""
        if self._pubsub is None:
            return False
        generation = self.generation
        waiter = self._barrier_next
        if waiter is None:
            waiter = self._barrier_next = asyncio.get_running_loop().create_future()
            if self._barrier_sent is None:
                self._send_barrier()
        return await waiter and self.generation == generation

    def _send_barrier(self) -> None:
        waiter, self._barrier_next = self._barrier_next, None
        pubsub = self._pubsub
        if waiter is None:
            return
        if pubsub is None:
            waiter.set_result(False)
            return
        self._barriers += 1
        token = f"{_BARRIER}{self._barriers}"
        deadline = asyncio.get_running_loop().call_later(
            BARRIER_TIMEOUT_SECONDS, self._barrier_timed_out, token
        )
        self._barrier_sent = (token, waiter, deadline)
        ping = asyncio.create_task(self._ping(pubsub, token))
        self._pings.add(ping)
        ping.add_done_callback(self._pings.discard)

    async def _ping(self, pubsub: PubSub, token: str) -> None:
        # On the subscription's connection as it is, never reconnecting it (the reader
        # does that, and subscribes again): a barrier on a connection that is down fails.
        connection = pubsub.connection
        try:
            if connection is None or not connection.is_connected:
                raise ConnectionError("the event subscription is not connected")
            await connection.send_command("PING", token, check_health=False)
        except Exception:
            self._barrier_done(token, ok=False)

    def _barrier_done(self, token: str, *, ok: bool) -> None:
        sent = self._barrier_sent
        if sent is None or sent[0] != token:
            return  # an answer to a barrier already given up
        self._barrier_sent = None
        _, waiter, deadline = sent
        deadline.cancel()
        if not waiter.done():
            waiter.set_result(ok)
        if self._barrier_next is not None:
            if ok:
                self._send_barrier()
            else:
                self._fail_next()

    def _fail_next(self) -> None:
        waiter, self._barrier_next = self._barrier_next, None
        if waiter is not None and not waiter.done():
            waiter.set_result(False)

    def _barrier_timed_out(self, token: str) -> None:
        if self._barrier_sent is None or self._barrier_sent[0] != token:
            return
        _log.warning("event subscription did not answer a barrier; subscribing again")
        self._barrier_done(token, ok=False)
        self._new_generation()
        pubsub = self._pubsub
        if pubsub is not None and pubsub.connection is not None:
            # The reader then fails and reconnects (redis-py), or the hub subscribes anew.
            task = asyncio.create_task(pubsub.connection.disconnect())
            self._pings.add(task)
            task.add_done_callback(self._pings.discard)

    def _new_generation(self) -> None:
        """The subscription was made again or lost: what was known from it may be stale,
        and a barrier in flight proves nothing."""
        self.generation += 1
        sent = self._barrier_sent
        if sent is not None:
            self._barrier_done(sent[0], ok=False)
        self._fail_next()

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
                    self._pubsub = pubsub
                    self.ready.set()
                    try:
                        await self._read(pubsub)
                    finally:
                        self._pubsub = None
                        self._new_generation()
            except asyncio.CancelledError:
                raise
            except Exception:
                # Listeners fall back on their own checks meanwhile; resubscribe shortly.
                self.ready.clear()
                _log.warning("event subscription lost; reconnecting", exc_info=True)
                await asyncio.sleep(1)

    async def _read(self, pubsub: PubSub) -> None:
        while True:
            # Polled with a timeout of our own: `listen()` would read under the client's
            # socket_timeout and drop the subscription whenever the channels are quiet.
            message = await pubsub.get_message(timeout=1.0)
            if message is None:
                continue
            kind = message.get("type")
            if kind == "message":
                self._dispatch(message["channel"], message["data"])
            elif kind == "pong":
                data = message["data"]
                self._barrier_done(data.decode() if isinstance(data, bytes) else data, ok=True)
            elif kind == "subscribe":
                # Made, or made again by redis-py after a reconnect: messages published
                # while it was away were missed.
                self._new_generation()
                for subscribed in list(self._subscribed):
                    subscribed()

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
