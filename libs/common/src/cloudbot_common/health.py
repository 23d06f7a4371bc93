"""Readiness checks the services share: Postgres reachable and migrated to head, Redis
reachable. Each returns {check: "ok" | what is wrong}."""

from __future__ import annotations

import asyncio

from redis.asyncio import Redis
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from cloudbot_common.migrate import head_revision

TIMEOUT_SECONDS = 2.0


async def check_database(engine: AsyncEngine) -> dict[str, str]:
    try:
        async with asyncio.timeout(TIMEOUT_SECONDS), engine.connect() as conn:
            current = await conn.scalar(text("SELECT version_num FROM alembic_version"))
    except Exception as exc:
        return {"postgres": f"unreachable: {type(exc).__name__}"}
    head = head_revision()
    migrations = "ok" if current == head else f"at {current}, head is {head}"
    return {"postgres": "ok", "migrations": migrations}


async def check_redis(redis: Redis) -> dict[str, str]:
    try:
        async with asyncio.timeout(TIMEOUT_SECONDS):
            await redis.ping()
    except Exception as exc:
        return {"redis": f"unreachable: {type(exc).__name__}"}
    return {"redis": "ok"}
