"""Postgres databases and Redis dbs of the test run's own."""

from __future__ import annotations

import asyncio
import os

import asyncpg
from alembic import command
from redis.asyncio import Redis

from cloudbot_common.migrate import alembic_config, ensure_database

PG_ADMIN = os.environ.get("TEST_PG_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_BASE = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379")
# First Redis db the run uses (one per xdist worker from there), so that two runs on one
# machine can keep apart.
REDIS_FIRST_DB = int(os.environ.get("TEST_REDIS_DB", "8"))


def database_url(name: str) -> str:
    return f"postgresql+asyncpg://postgres@127.0.0.1:5432/{name}"


async def admin(sql: str) -> None:
    """Run one statement as the Postgres superuser, outside any database of ours."""
    conn = await asyncpg.connect(PG_ADMIN)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


async def drop_database(name: str) -> None:
    await admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def migrate(url: str, revision: str = "head") -> None:
    """Create the database if needed and migrate it to `revision`, as `make migrate` does
    (in this process: no event loop may be running)."""
    asyncio.run(ensure_database(url))
    command.upgrade(alembic_config(url), revision)


async def flush_redis(url: str) -> None:
    client = Redis.from_url(url)
    await client.flushdb()
    await client.aclose()
