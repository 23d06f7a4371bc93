"""Live relay sessions: the per-user limit, cut-off on events, idle timeout, metrics.

The per-user limit holds across gateway replicas: each session holds a lease in a Redis
sorted set per user (member: session id, score: lease expiry), renewed while it lives, so
a replica that dies without cleaning up frees its leases within LEASE_SECONDS.

One periodic tick per process does the bookkeeping no frame should pay for: it folds the
sessions' byte counters into the metrics, ends idle sessions, renews leases and, as a
fallback for events missed while the subscription was down, re-checks that each session's
login session and instance are still good.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import TYPE_CHECKING, Protocol

from redis.asyncio import Redis
from websockets.frames import CloseCode

from cloudbot_common import activity
from cloudbot_common.audit import Origin
from cloudbot_common.events import EventHub, InstanceStateEvent
from cloudbot_common.leases import Leases
from cloudbot_common.logging import get_logger
from cloudbot_common.models import InstanceState
from cloudbot_common.revocations import REDIS_FAILURES, RevocationWatch
from cloudbot_common.tickets import Channel
from cloudbot_gateway.background import Background
from cloudbot_gateway.metrics import Metrics
from cloudbot_gateway.refusals import Refusal
from cloudbot_gateway.relay import Stop

if TYPE_CHECKING:
    from cloudbot_gateway.connection import GatewayConnection

_log = get_logger(__name__)

LEASE_SECONDS = 90
_RENEW_EVERY = LEASE_SECONDS / 3
# How often byte counters reach the metrics and idle sessions are looked for.
TICK_SECONDS = 1.0
_LEASES_KEY = "cloudbot:gateway:sessions:{}"

CLOSE_INSTANCE_STATE = CloseCode.GOING_AWAY
CLOSE_LOGGED_OUT = CloseCode.POLICY_VIOLATION
CLOSE_IDLE = CloseCode.GOING_AWAY
CLOSE_SHUTDOWN = CloseCode.SERVICE_RESTART


class Upstream(Protocol):
    """The instance's end of a session: the desktop's VNC server (`vnc.DesktopUpstream`)
    or the agent's WebSocket (`relay.AgentUpstream`)."""

    def bind(self, client: GatewayConnection, session: Session) -> None:
        """Pair with the client whose upgrade was granted, before the handshake ends."""

    async def relay(self, client: GatewayConnection, session: Session) -> str:
        """Relay until either end closes or the session is ended; returns why it ended."""
        ...

    def abandon(self) -> None:
        """Let go at once: the handshake never completed."""


@dataclass(eq=False, slots=True)
class Session:
    user_id: uuid.UUID
    login_session_id: uuid.UUID
    instance_id: uuid.UUID
    channel: Channel
    via: str
    stop: asyncio.Future[Stop]
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    upstream: Upstream | None = None
    origin: Origin | None = None  # the client's address and user agent, for the audit log
    started: bool = False
    bytes_up: int = 0
    bytes_down: int = 0
    opened_at: float = field(default_factory=time.monotonic)
    # Bookkeeping of the periodic tick.
    _reported_up: int = 0
    _reported_down: int = 0
    _active_at: float = field(default_factory=time.monotonic)
    _unsubscribe: list[Callable[[], None]] = field(default_factory=list)

    def end(self, code: int, reason: str, cause: str) -> None:
        """Ask the relay to close this session (idempotent)."""
        if not self.stop.done():
            self.stop.set_result(Stop(code, reason, cause))


class SessionRegistry:
    def __init__(
        self,
        redis: Redis,
        hub: EventHub,
        metrics: Metrics,
        states: Callable[[Collection[uuid.UUID]], Awaitable[dict[uuid.UUID, str]]],
        *,
        max_per_user: int,
        idle_timeout: float,
        revocations: RevocationWatch,
    ) -> None:
        self._redis = redis
        self._hub = hub
        self._states = states
        self._metrics = metrics
        self._max_per_user = max_per_user
        self._idle_timeout = idle_timeout
        self._revocations = revocations
        self._leases = Leases(redis, _LEASES_KEY, LEASE_SECONDS)
        self._live: set[Session] = set()
        self._empty = asyncio.Event()
        self._empty.set()
        # Lease releases; a lost one expires on its own within LEASE_SECONDS.
        self._background = Background("session lease release failed")
        self._ticker: asyncio.Task[None] | None = None
        self._bytes = {
            (channel, direction): metrics.bytes_relayed.labels(channel.value, direction)
            for channel in Channel
            for direction in ("up", "down")
        }
        self._open = {c: metrics.open_sessions.labels(c.value) for c in Channel}

    def __len__(self) -> int:
        return len(self._live)

    def start(self) -> None:
        self._ticker = asyncio.create_task(self._tick_forever(), name="session-tick")

    async def aclose(self) -> None:
        if self._ticker is not None:
            self._ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ticker
        for session in self._live:
            self._report_bytes(session)
        await self._background.wait(2)

    def new_session(
        self,
        user_id: uuid.UUID,
        login_session_id: uuid.UUID,
        instance_id: uuid.UUID,
        channel: Channel,
        via: str,
    ) -> Session:
        stop: asyncio.Future[Stop] = asyncio.get_running_loop().create_future()
        return Session(user_id, login_session_id, instance_id, channel, via, stop)

    async def acquire(self, session: Session) -> None:
        """Take a lease for `session` or refuse with 429 when the user has too many."""
        if not await self._leases.acquire(session.user_id, session.id, self._max_per_user):
            raise Refusal(
                HTTPStatus.TOO_MANY_REQUESTS,
                "too_many_sessions",
                f"At most {self._max_per_user} open sessions per user.",
            )

    def release_soon(self, session: Session) -> None:
        """Give the lease back without waiting (safe from synchronous callbacks)."""
        self._background.spawn(self._leases.release(session.user_id, session.id))

    def attach(self, session: Session) -> None:
        """The handshake is done: watch for the events that end this session."""
        session.started = True
        instance_id = str(session.instance_id)

        def on_instance(event: InstanceStateEvent) -> None:
            if event.state != InstanceState.RUNNING.value:
                session.end(CLOSE_INSTANCE_STATE, f"instance {event.state}", "instance_state")

        def on_revoked() -> None:
            session.end(CLOSE_LOGGED_OUT, "login session ended", "logout")

        session._unsubscribe = [
            self._hub.on_instance(instance_id, on_instance),
            self._hub.on_session_revoked(str(session.login_session_id), on_revoked),
        ]
        self._live.add(session)
        self._empty.clear()
        self._open[session.channel].inc()
        self._metrics.sessions.labels(session.channel.value).inc()

    def detach(self, session: Session, cause: str) -> None:
        for unsubscribe in session._unsubscribe:
            unsubscribe()
        session._unsubscribe = []
        self._live.discard(session)
        if not self._live:
            self._empty.set()
        self._open[session.channel].dec()
        self._report_bytes(session)
        self._metrics.session_closes.labels(session.channel.value, cause).inc()
        self.release_soon(session)

    def end_all(self, code: int, reason: str, cause: str) -> None:
        for session in list(self._live):
            session.end(code, reason, cause)

    async def wait_empty(self, grace_seconds: float) -> bool:
        try:
            async with asyncio.timeout(grace_seconds):
                await self._empty.wait()
        except TimeoutError:
            return False
        return True

    # --- the periodic tick -------------------------------------------------------------

    async def _tick_forever(self) -> None:
        next_check = time.monotonic() + _RENEW_EVERY
        while True:
            await asyncio.sleep(TICK_SECONDS)
            now = time.monotonic()
            self._end_idle(now)
            if now >= next_check:
                next_check = now + _RENEW_EVERY
                try:
                    await self._renew_and_recheck()
                except Exception as exc:
                    _log.warning("session lease renewal failed", error=type(exc).__name__)

    def _report_bytes(self, session: Session) -> bool:
        """Add what the session relayed since the last report to the metrics; say if any."""
        up = session.bytes_up - session._reported_up
        down = session.bytes_down - session._reported_down
        if up:
            self._bytes[session.channel, "up"].inc(up)
            session._reported_up = session.bytes_up
        if down:
            self._bytes[session.channel, "down"].inc(down)
            session._reported_down = session.bytes_down
        return bool(up or down)

    def _end_idle(self, now: float) -> None:
        """Report bytes relayed; end sessions that relayed none for the idle timeout."""
        for session in self._live:
            if self._report_bytes(session):
                session._active_at = now
            elif now - session._active_at >= self._idle_timeout:
                session.end(CLOSE_IDLE, "idle timeout", "idle")

    async def _renew_and_recheck(self) -> None:
        """Renew the leases, and end sessions whose login or instance changed while events
        were missed (the subscription was down, or a revocation's marker was never
        written): ended logins and revoked tokens from Redis and Postgres, states from
        Postgres."""
        sessions = list(self._live)
        if not sessions:
            return
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                for session in sessions:
                    await self._leases.renew(session.user_id, session.id, client=pipe)
                activity.mark(pipe, {s.instance_id for s in sessions})  # in use: not idle
                await pipe.execute()
        except REDIS_FAILURES as exc:
            # The leases lapse on their own; the re-check below must happen all the same.
            _log.warning("session lease renewal failed", error=type(exc).__name__)
        revoked = await self._revocations.revoked_among({s.login_session_id for s in sessions})
        states = await self._states({s.instance_id for s in sessions})
        for session in sessions:
            state = states.get(session.instance_id, InstanceState.TERMINATED.value)
            if session.login_session_id in revoked:
                session.end(CLOSE_LOGGED_OUT, "login session ended", "logout")
            elif state != InstanceState.RUNNING.value:
                session.end(CLOSE_INSTANCE_STATE, f"instance {state}", "instance_state")
