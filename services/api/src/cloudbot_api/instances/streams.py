"""The bounds of a Server-Sent Events stream.

At most SSE_MAX_STREAMS_PER_USER streams are open per user across every API replica (each
holds a lease, see cloudbot_common.leases). A stream ends when its login session does
(logout, revocation) and after SSE_MAX_STREAM_SECONDS; the client then reconnects and is
authenticated afresh.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import anyio
from redis.asyncio import Redis

from cloudbot_api.errors import ProblemError
from cloudbot_common.events import EventHub
from cloudbot_common.leases import Leases
from cloudbot_common.logging import get_logger
from cloudbot_common.revocations import REDIS_FAILURES

log = get_logger(__name__)

_LEASES_KEY = "cloudbot:api:streams:{}"
LEASE_SECONDS = 90


class EventStreams:
    """One per process: opens bounded streams."""

    def __init__(
        self, redis: Redis, events: EventHub, *, max_per_user: int, max_seconds: int
    ) -> None:
        self.leases = Leases(redis, _LEASES_KEY, LEASE_SECONDS)
        self._events = events
        self.max_per_user = max_per_user
        self.max_seconds = max_seconds
        self._releasing: set[asyncio.Task[Any]] = set()

    async def open(self, user_id: uuid.UUID, session_id: uuid.UUID) -> Stream:
        """A stream for this login, or 429 when its user has too many open."""
        stream = Stream(self, user_id)
        if not await self.leases.acquire(user_id, stream.id, self.max_per_user):
            raise ProblemError(
                429,
                "too_many_streams",
                f"At most {self.max_per_user} open event streams per user.",
                headers={"Retry-After": "5"},
            )
        stream.start(self._events.on_session_revoked(str(session_id), stream.session_ended))
        return stream

    def release(self, stream: Stream) -> None:
        task = asyncio.ensure_future(self.leases.release(stream.user_id, stream.id))
        self._releasing.add(task)
        task.add_done_callback(self._released)

    def _released(self, task: asyncio.Task[Any]) -> None:
        self._releasing.discard(task)
        if not task.cancelled() and task.exception() is not None:
            # The lease lapses on its own within LEASE_SECONDS.
            log.warning("stream lease release failed", error=type(task.exception()).__name__)


class Stream:
    def __init__(self, streams: EventStreams, user_id: uuid.UUID) -> None:
        self._streams = streams
        self.user_id = user_id
        self.id = uuid.uuid4().hex
        self.ended = anyio.Event()
        self.reason = ""
        loop = asyncio.get_running_loop()
        self._renew_at = loop.time() + LEASE_SECONDS / 3
        self._timer: asyncio.TimerHandle | None = None
        self._unsubscribe: Any = None

    def start(self, unsubscribe: Any) -> None:
        self._unsubscribe = unsubscribe
        self._timer = asyncio.get_running_loop().call_later(
            self._streams.max_seconds, self._end, "lifetime"
        )

    def session_ended(self) -> None:
        self._end("session_ended")

    def _end(self, reason: str) -> None:
        if not self.ended.is_set():
            self.reason = reason
            self.ended.set()

    async def wait(self, wake: anyio.Event, seconds: float) -> None:
        """Until `wake` is set, the stream ends, or `seconds` pass; keeps the lease."""
        with anyio.move_on_after(seconds):
            async with anyio.create_task_group() as group:

                async def until(event: anyio.Event) -> None:
                    await event.wait()
                    group.cancel_scope.cancel()

                group.start_soon(until, wake)
                group.start_soon(until, self.ended)
        now = asyncio.get_running_loop().time()
        if now >= self._renew_at:
            self._renew_at = now + LEASE_SECONDS / 3
            try:
                await self._streams.leases.renew(self.user_id, self.id)
            except REDIS_FAILURES as exc:
                log.warning("stream lease renewal failed", error=type(exc).__name__)

    def close(self) -> None:
        if self.reason:
            log.info("event stream ended", reason=self.reason)
        if self._timer is not None:
            self._timer.cancel()
        if self._unsubscribe is not None:
            self._unsubscribe()
        self._streams.release(self)
