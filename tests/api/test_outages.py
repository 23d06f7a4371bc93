"""An API process whose queue or Redis is unreachable: what it still accepts, and that
what it refuses leaves nothing half-written."""

from __future__ import annotations

import uuid

from sqlalchemy import func, select

from cloudbot_common.models import Instance, OutboxCommand
from tests.support.api import api_process
from tests.support.clients import api_client
from tests.support.instances import create
from tests.support.problems import assert_problem
from tests.support.processes import free_port


async def test_broker_down_at_create_still_accepts_and_keeps_the_command(base_env, user, db_engine):
    """The queue is unreachable: the create is stored with its command, which stays
    unpublished for the relay to send once the broker is back."""
    dead_broker = f"redis://127.0.0.1:{free_port()}/0"
    env = {**base_env, "CELERY_BROKER_URL": dead_broker}
    with api_process(env, "api-dead-broker") as api:
        async with api_client(api) as client:
            r = await create(client, user)
    assert r.status_code == 202, r.text
    async with db_engine.connect() as conn:
        row = (
            await conn.execute(
                select(OutboxCommand).where(OutboxCommand.instance_id == uuid.UUID(r.json()["id"]))
            )
        ).one()
    assert row.published_at is None
    assert row.completed_at is None


async def test_redis_down_at_create_fails_cleanly(base_env, user, db_engine):
    """Redis (sessions, rate limits) unreachable: a clear 503 and nothing written."""
    dead = f"redis://127.0.0.1:{free_port()}/0"
    async with db_engine.connect() as conn:
        before = await conn.scalar(select(func.count()).select_from(Instance))
    with api_process({**base_env, "REDIS_URL": dead}, "api-dead-redis") as api:
        async with api_client(api) as client:
            r = await create(client, user)
            ready = await client.get("/readyz")
    assert_problem(r, 503, "dependency_unavailable")
    assert r.headers["retry-after"]
    assert ready.status_code == 503
    async with db_engine.connect() as conn:
        assert await conn.scalar(select(func.count()).select_from(Instance)) == before
