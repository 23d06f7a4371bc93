"""What a worker process holds for its whole life: one event loop, one engine, one Redis
client, one backend. Made in Celery's `worker_process_init` (after the fork), never at
import; every task's coroutine runs on this loop, so pooled connections stay valid."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

from celery import Celery
from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import AsyncEngine

from cloudbot_common.db import SessionFactory, create_engine, create_session_factory
from cloudbot_common.events import InstanceStateEvent, publish_instance_event
from cloudbot_common.logging import get_logger
from cloudbot_common.redis_client import redis_client
from cloudbot_common.settings import Settings
from cloudbot_provisioner.backends import open_backend
from cloudbot_provisioner.backends.base import Backend

T = TypeVar("T")
log = get_logger(__name__)

# A worker process runs one task at a time: a lock connection, a session, and slack.
_POOL_SIZE = 3


@dataclass(slots=True)
class Runtime:
    settings: Settings
    celery: Celery
    loop: asyncio.AbstractEventLoop
    engine: AsyncEngine
    sessions: SessionFactory
    redis: Redis
    backend: Backend

    @classmethod
    def open(cls, settings: Settings, celery: Celery) -> Runtime:
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        engine = create_engine(settings, pool_size=_POOL_SIZE)
        backend = loop.run_until_complete(open_backend(settings))
        return cls(
            settings=settings,
            celery=celery,
            loop=loop,
            engine=engine,
            sessions=create_session_factory(engine),
            redis=redis_client(settings),
            backend=backend,
        )

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self.loop.run_until_complete(coro)

    async def publish(self, events: list[InstanceStateEvent]) -> None:
        """Tell listeners after the commit. Losing this is harmless: Postgres has the
        state and its history, which SSE streams replay."""
        for event in events:
            try:
                await publish_instance_event(self.redis, event)
            except Exception:
                log.warning("state event not published", instance_id=event.instance_id)

    def close(self) -> None:
        async def _close() -> None:
            await self.backend.aclose()
            await self.redis.aclose()
            await self.engine.dispose()

        try:
            self.run(_close())
        finally:
            self.loop.close()


_runtime: Runtime | None = None


def open_runtime(settings: Settings, celery: Celery) -> Runtime:
    global _runtime
    if _runtime is None:
        _runtime = Runtime.open(settings, celery)
    return _runtime


def get_runtime(settings: Settings, celery: Celery) -> Runtime:
    """This process's runtime. Made here only where `worker_process_init` is not sent
    (the solo and threads pools, eager tasks)."""
    return _runtime if _runtime is not None else open_runtime(settings, celery)


def close_runtime() -> None:
    global _runtime
    if _runtime is not None:
        runtime, _runtime = _runtime, None
        runtime.close()
