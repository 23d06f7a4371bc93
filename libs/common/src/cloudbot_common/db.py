"""Async engine and sessions. One engine per process, made at start-up, never at import."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from sqlalchemy import event
from sqlalchemy.exc import DisconnectionError
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

from cloudbot_common.settings import Settings

SessionFactory = async_sessionmaker[AsyncSession]

# A pooled connection idle for longer than this is pinged before use. One in steady use
# is not: the check costs three round trips (asyncpg's ping opens a transaction for
# pgbouncer's sake), more than the query it would precede.
PING_AFTER_IDLE_SECONDS = 5.0


def create_engine(
    settings: Settings,
    *,
    pool_size: int | None = None,
    max_overflow: int = 5,
    autocommit: bool = False,
) -> AsyncEngine:
    """The process's engine. `autocommit`: connections that run each statement on its own
    (no BEGIN, no COMMIT or ROLLBACK), for work that only reads; a pool of their own, so
    that no connection switches its isolation level back and forth per checkout.

    `max_overflow`: connections opened beyond the pool under a burst and closed when
    returned. Under steady concurrency above the pool an asyncio pool keeps closing
    returned overflow connections while others wait and opening new ones (a Postgres
    backend started per request): a process that serves steady concurrency (the API) is
    better off with a pool of the size it needs and none."""
    options: dict[str, Any] = {"isolation_level": "AUTOCOMMIT"} if autocommit else {}
    command_timeout = settings.database_command_timeout_seconds
    engine = create_async_engine(
        settings.database_url,
        **options,
        pool_size=pool_size or settings.database_pool_size,
        max_overflow=max_overflow,
        pool_recycle=1800,
        pool_timeout=settings.database_pool_timeout_seconds,
        connect_args={
            "timeout": settings.database_connect_timeout_seconds,
            "command_timeout": command_timeout,
            "server_settings": {"statement_timeout": str(int(command_timeout * 1000))},
        },
    )
    _ping_when_idle(engine)
    return engine


def _ping_when_idle(engine: AsyncEngine) -> None:
    """pool_pre_ping made cheap: a connection the server or the network closed is noticed
    for free (the driver saw the connection end), one that sat idle is pinged, and one
    returned a moment ago is as good as the statement that just ran on it."""
    idle_since = "cloudbot_idle_since"

    @event.listens_for(engine.sync_engine, "checkin")
    def _checkin(_dbapi_connection: Any, record: Any) -> None:
        record.info[idle_since] = time.monotonic()

    @event.listens_for(engine.sync_engine, "checkout")
    def _checkout(dbapi_connection: Any, record: Any, _proxy: Any) -> None:
        # The pool discards a connection refused here and checks out another.
        driver = record.driver_connection
        if driver is not None and driver.is_closed():
            raise DisconnectionError("pooled connection was closed")
        since = record.info.get(idle_since)
        if since is None or time.monotonic() - since < PING_AFTER_IDLE_SECONDS:
            return
        try:
            dbapi_connection.ping()
        except Exception as exc:
            raise DisconnectionError("pooled connection is dead") from exc


def create_session_factory(engine: AsyncEngine) -> SessionFactory:
    return async_sessionmaker(engine, expire_on_commit=False, autoflush=False)


@asynccontextmanager
async def unit_of_work(factory: SessionFactory) -> AsyncIterator[AsyncSession]:
    """A session whose work commits when the block ends and rolls back if it raises.

    Services and repositories only flush; whoever opens the unit of work owns the commit.
    """
    async with factory() as session:
        try:
            yield session
            await session.commit()
        except BaseException:
            await session.rollback()
            raise
