"""Per-process resources of the API, made in the lifespan and reached through `deps`."""

from __future__ import annotations

from dataclasses import dataclass

from celery import Celery
from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import AsyncEngine

from cloudbot_api.instances.streams import EventStreams
from cloudbot_api.proxies import TrustedProxies
from cloudbot_api.ratelimit import RateLimiter
from cloudbot_api.repository import ReadConnections
from cloudbot_common.db import SessionFactory
from cloudbot_common.events import EventHub
from cloudbot_common.revocations import RevocationWatch
from cloudbot_common.security.jwt_tokens import TokenCodec
from cloudbot_common.security.passwords import Passwords
from cloudbot_common.security.vault import Vault
from cloudbot_common.settings import Settings


@dataclass(slots=True)
class Resources:
    settings: Settings
    engine: AsyncEngine
    sessions: SessionFactory
    # Autocommit sessions for requests that only read (see `deps.get_uow`), on an engine
    # (a pool) of their own.
    read_engine: AsyncEngine
    read_sessions: SessionFactory
    # The same engine's connections without a session, for the read-only routes'
    # statements (`repository.ReadRepository`): `read_engine.connect`.
    read_connections: ReadConnections
    redis: Redis
    celery: Celery
    passwords: Passwords
    tokens: TokenCodec
    vault: Vault
    limiter: RateLimiter
    revocations: RevocationWatch
    streams: EventStreams
    proxies: TrustedProxies
    events: EventHub

    async def close(self) -> None:
        await self.revocations.stop()
        await self.events.stop()
        self.passwords.close()
        await self.limiter.close()
        await self.redis.aclose()
        await self.engine.dispose()
        await self.read_engine.dispose()
