"""Fixtures for the operations tests: a private database and Redis db per stack, so the
queue and the outbox these tests measure are theirs alone (the shared test stack's
workers never consume from them)."""

from __future__ import annotations

import asyncio
import os
import secrets
from collections.abc import Iterator

import pytest

from tests.support.databases import (
    REDIS_BASE,
    database_url,
    drop_database,
    flush_redis,
    migrate,
)
from tests.support.dev_stack import Stack, run_stack

# Redis dbs 1-7 are left to these tests (the shared test stack uses 8 and up).
_REDIS_SLOTS = {"metrics": 1, "flower": 2, "stack": 3}


def _worker_offset() -> int:
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    return int(worker.removeprefix("gw") or 0) * len(_REDIS_SLOTS)


@pytest.fixture(scope="module")
def private_env(
    request: pytest.FixtureRequest, base_env: dict[str, str]
) -> Iterator[dict[str, str]]:
    """`base_env` with a freshly migrated database and an empty Redis db of its own.

    The module names its slot with `REDIS_SLOT = "metrics" | "flower" | "stack"`."""
    slot = _REDIS_SLOTS[request.module.REDIS_SLOT] + _worker_offset()
    assert slot < 8, "too many xdist workers for the private Redis dbs"
    redis_url = f"{REDIS_BASE}/{slot}"
    asyncio.run(flush_redis(redis_url))
    name = f"cloudbot_ops_{slot}_{secrets.token_hex(4)}"
    url = database_url(name)
    migrate(url)
    yield {**base_env, "DATABASE_URL": url, "REDIS_URL": redis_url}
    asyncio.run(drop_database(name))
    asyncio.run(flush_redis(redis_url))


@pytest.fixture(scope="module")
def stack(private_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """The stack exactly as `make dev` runs it, on the module's private database and Redis
    db (a module may override `private_env` for what `make dev` itself sets)."""
    yield from run_stack(private_env, tmp_path_factory.mktemp("stack"))
