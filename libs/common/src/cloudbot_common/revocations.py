"""Ending a login session, failing closed when Redis will not take it.

Postgres's `login_sessions.revoked_at` is the truth. The Redis marker (`events.
revoked_session_key`) and the session event are how every API and gateway process hears
of it at once. If the marker cannot be written, the revocation stays "unannounced" in
Postgres (`revocation_announced_at` NULL) and nothing is lost:

- every API and gateway process runs a `RevocationWatch`, which reads the unannounced
  revocations every SWEEP_SECONDS, refuses their tokens from then on, ends their live
  streams and relay sessions, and writes their markers once Redis takes them;
- a check that cannot read Redis asks Postgres instead of letting the token through.

A watch `in_memory` (the API's) answers most checks without a round trip of its own: it
keeps the revoked sessions it heard of on the event hub (loaded from the markers, and from
Postgres's recent revocations, each time the subscription is made; then from each
message), and before answering "not revoked" it
waits for the hub to have caught up (`EventHub.caught_up`: one PING on the subscription,
shared by every check waiting at that moment), so that a revocation announced anywhere
before the check began is known here. Whenever that cannot be known (no subscription, its
markers not loaded yet, the subscription made again meanwhile, or the barrier not
answered), the check asks Redis, and Postgres if Redis fails, as before.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections import Counter
from collections.abc import Collection
from datetime import UTC, datetime, timedelta

from redis.asyncio import Redis
from redis.exceptions import RedisError
from sqlalchemy import select, update
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine

from cloudbot_common.events import (
    EventHub,
    revoke_login_session,
    revoked_session_key,
    revoked_session_pattern,
)
from cloudbot_common.logging import get_logger
from cloudbot_common.models import LoginSession, PersonalAccessToken

_log = get_logger(__name__)

SWEEP_SECONDS = 2.0
# What a Redis client raises when the server is away or refuses a command.
REDIS_FAILURES = (RedisError, OSError, TimeoutError)


class RevocationWatch:
    def __init__(
        self,
        engine: AsyncEngine,
        redis: Redis,
        hub: EventHub,
        *,
        remember_seconds: int,
        in_memory: bool = False,
    ) -> None:
        self._engine = engine
        self._redis = redis
        self._hub = hub
        # As long as an access token of a revoked session can live.
        self._remember = remember_seconds
        # Revoked in Postgres, marker not yet written: refused here without asking Redis.
        self.pending: set[uuid.UUID] = set()
        self._task: asyncio.Task[None] | None = None
        self._in_memory = in_memory
        # Revoked sessions heard of, with when to forget them (monotonic seconds).
        self._heard: dict[uuid.UUID, float] = {}
        # The hub generation whose markers were loaded (-1: none): while it is the hub's
        # current one, `_heard` holds every revocation announced so far.
        self._loaded = -1
        self._loading: asyncio.Task[None] | None = None
        # Which way each check was answered: "memory", "redis" or "database".
        self.answered_by: Counter[str] = Counter()
        if in_memory:
            hub.on_any_session_revoked(self._hear)
            hub.on_subscribed(self._load_markers)

    def start(self) -> None:
        self._task = asyncio.create_task(self._sweep_forever(), name="revocation-watch")

    async def stop(self) -> None:
        for task in (self._task, self._loading):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    async def announce(
        self, session_ids: Collection[uuid.UUID], *, remember_seconds: int | None = None
    ) -> None:
        """Write the markers of sessions whose revocation was committed (kept for
        `remember_seconds`, by default as long as an access token lives), and say so in
        Postgres. Raises if Redis will not take them: the sessions are then refused here at
        once, and by every process within SWEEP_SECONDS (or, for a personal access token,
        by the gateway's re-check of its sessions), while the watch keeps trying."""
        remember = remember_seconds or self._remember
        try:
            for session_id in session_ids:
                await revoke_login_session(self._redis, session_id, remember_seconds=remember)
        except REDIS_FAILURES:
            self._refuse(session_ids)
            raise
        await self._mark_announced(session_ids)

    async def is_revoked(self, session_id: uuid.UUID) -> bool:
        if session_id in self.pending or session_id in self._heard:
            self.answered_by["memory"] += 1
            return True
        # Whatever was announced before now has reached `_heard` once the hub caught up,
        # unless the subscription was made again meanwhile (then caught_up says False).
        if self._in_memory and self._loaded == self._hub.generation and await self._hub.caught_up():
            self.answered_by["memory"] += 1
            return session_id in self._heard or session_id in self.pending
        try:
            revoked = bool(await self._redis.exists(revoked_session_key(session_id)))
        except REDIS_FAILURES:
            self.answered_by["database"] += 1
            return bool(await self.revoked_in_database([session_id]))
        self.answered_by["redis"] += 1
        return revoked

    def _hear(self, session_id: str) -> None:
        with contextlib.suppress(ValueError):
            self._heard[uuid.UUID(session_id)] = time.monotonic() + self._remember

    def _load_markers(self) -> None:
        """The subscription was made (again): load every marker now in Redis, after which
        `_heard` is complete for this generation (what is announced from now on arrives
        as messages)."""
        if self._loading is not None:
            self._loading.cancel()
        self._loading = asyncio.create_task(self._load(self._hub.generation))

    async def _load(self, generation: int) -> None:
        prefix = revoked_session_key("")
        while generation == self._hub.generation:
            try:
                async for key in self._redis.scan_iter(match=revoked_session_pattern(), count=1000):
                    name = key.decode() if isinstance(key, bytes) else key
                    self._hear(name.removeprefix(prefix))
                # And from Postgres, the truth: a Redis that restarted without its data
                # (the usual reason to subscribe again) has lost the markers.
                for session_id in await self._recently_revoked():
                    self._heard[session_id] = time.monotonic() + self._remember
            except (*REDIS_FAILURES, SQLAlchemyError) as exc:
                _log.warning("revocations unreadable; retrying", error=type(exc).__name__)
                await asyncio.sleep(1)
                continue
            if generation == self._hub.generation:
                self._loaded = generation
            return

    async def _recently_revoked(self) -> list[uuid.UUID]:
        """Login sessions and personal access tokens revoked within the time an access
        token lives: those whose tokens may still be presented."""
        since = datetime.now(UTC) - timedelta(seconds=self._remember)
        async with self._engine.connect() as conn:
            logins = await conn.scalars(
                select(LoginSession.id).where(LoginSession.revoked_at >= since)
            )
            found = list(logins)
            tokens = await conn.scalars(
                select(PersonalAccessToken.id).where(PersonalAccessToken.revoked_at >= since)
            )
            return found + list(tokens)

    def _forget_expired(self) -> None:
        now = time.monotonic()
        for session_id in [s for s, until in self._heard.items() if until < now]:
            del self._heard[session_id]

    async def revoked_among(self, session_ids: Collection[uuid.UUID]) -> set[uuid.UUID]:
        """Which of `session_ids` (login sessions, or personal access tokens standing in
        for one) are revoked, by Redis's markers and by Postgres alike: for the periodic
        re-check of long-lived sessions, which so never outlive a marker that was lost."""
        ids = list(session_ids)
        found = {i for i in ids if i in self.pending}
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                for session_id in ids:
                    pipe.exists(revoked_session_key(session_id))
                marked = await pipe.execute()
        except REDIS_FAILURES as exc:
            _log.warning("revocation markers unreadable; asking Postgres", error=type(exc).__name__)
        else:
            found |= {i for i, yes in zip(ids, marked, strict=True) if yes}
        return found | await self.revoked_in_database(ids)

    async def revoked_in_database(self, session_ids: Collection[uuid.UUID]) -> set[uuid.UUID]:
        """Which of `session_ids` Postgres says are revoked: login sessions, and personal
        access tokens (whose id is the session of what was opened with them)."""
        if not session_ids:
            return set()
        ids = list(session_ids)
        async with self._engine.connect() as conn:
            logins = await conn.scalars(
                select(LoginSession.id).where(
                    LoginSession.id.in_(ids), LoginSession.revoked_at.is_not(None)
                )
            )
            found = set(logins)
            tokens = await conn.scalars(
                select(PersonalAccessToken.id).where(
                    PersonalAccessToken.id.in_(ids), PersonalAccessToken.revoked_at.is_not(None)
                )
            )
            return found | set(tokens)

    def _refuse(self, session_ids: Collection[uuid.UUID]) -> None:
        for session_id in session_ids:
            if session_id not in self.pending:
                self.pending.add(session_id)
                # What the session event would have done: end live streams and sessions.
                self._hub.session_revoked(str(session_id))

    async def _mark_announced(self, session_ids: Collection[uuid.UUID]) -> None:
        async with self._engine.begin() as conn:
            await conn.execute(
                update(LoginSession)
                .where(
                    LoginSession.id.in_(list(session_ids)),
                    LoginSession.revocation_announced_at.is_(None),
                )
                .values(revocation_announced_at=datetime.now(UTC))
            )
        self.pending.difference_update(session_ids)

    async def _sweep_forever(self) -> None:
        while True:
            self._forget_expired()
            try:
                await self.sweep()
            except Exception as exc:
                _log.warning("revocation sweep failed", error=type(exc).__name__)
            await asyncio.sleep(SWEEP_SECONDS)

    async def sweep(self) -> None:
        """Refuse every unannounced revocation, then try to announce it."""
        async with self._engine.connect() as conn:
            result = await conn.execute(
                select(LoginSession.id, LoginSession.revoked_at).where(
                    LoginSession.revoked_at.is_not(None),
                    LoginSession.revocation_announced_at.is_(None),
                )
            )
            rows = [(session_id, revoked_at) for session_id, revoked_at in result if revoked_at]
        if not rows:
            self.pending.clear()
            return
        horizon = datetime.now(UTC) - timedelta(seconds=self._remember)
        # Older than any access token they issued: nothing left to refuse or announce.
        expired = [session_id for session_id, revoked_at in rows if revoked_at < horizon]
        live = [session_id for session_id, revoked_at in rows if revoked_at >= horizon]
        self.pending.intersection_update(live)
        self._refuse(live)
        if expired:
            await self._mark_announced(expired)
        if live:
            with contextlib.suppress(*REDIS_FAILURES):
                await self.announce(live)
