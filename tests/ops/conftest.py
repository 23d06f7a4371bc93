"""Fixtures for the operations tests: a private database and Redis db per stack, so the
queue and the outbox these tests measure are theirs alone (the shared test stack's
workers never consume from them)."""

from __future__ import annotations

import asyncio
import os
import secrets
import subprocess
from collections.abc import Iterator

import asyncpg
import pytest
from redis.asyncio import Redis

from tests.support.databases import PG_ADMIN, REDIS_BASE
from tests.support.processes import PYTHON

# Redis dbs 1-7 are left to these tests (the shared test stack uses 8 and up).
_REDIS_SLOTS = {"metrics": 1, "flower": 2, "stack": 3}


def _worker_offset() -> int:
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    return int(worker.removeprefix("gw") or 0) * len(_REDIS_SLOTS)


async def _admin(sql: str) -> None:
    conn = await asyncpg.connect(PG_ADMIN)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


def _flush(url: str) -> None:
    async def flush() -> None:
        client = Redis.from_url(url)
        await client.flushdb()
        await client.aclose()

    asyncio.run(flush())


@pytest.fixture(scope="module")
def private_env(
    request: pytest.FixtureRequest, base_env: dict[str, str]
) -> Iterator[dict[str, str]]:
    """`base_env` with a freshly migrated database and an empty Redis db of its own.

    The module names its slot with `REDIS_SLOT = "metrics" | "flower" | "stack"`."""
    slot = _REDIS_SLOTS[request.module.REDIS_SLOT] + _worker_offset()
    assert slot < 8, "too many xdist workers for the private Redis dbs"
    redis_url = f"{REDIS_BASE}/{slot}"
    _flush(redis_url)
    name = f"cloudbot_ops_{slot}_{secrets.token_hex(4)}"
    asyncio.run(_admin(f'CREATE DATABASE "{name}"'))
    database_url = f"postgresql+asyncpg://postgres@127.0.0.1:5432/{name}"
    env = {**base_env, "DATABASE_URL": database_url, "REDIS_URL": redis_url}
    subprocess.run(
        [PYTHON, "-m", "cloudbot_common.migrate", "upgrade", "head"],
        env={**os.environ, **env},
        check=True,
    )
    yield env
    asyncio.run(_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    _flush(redis_url)
