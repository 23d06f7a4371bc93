"""Redis goes away just as a create arrives. Either the request succeeds and the machine
is provisioned once Redis is back (the command waited in the outbox), or it fails
cleanly with nothing half-written."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest
from sqlalchemy import func, select

from cloudbot_common.models import Instance, OutboxCommand
from tests.support.api import api_process
from tests.support.clients import api_client
from tests.support.harness import (
    AWS_ENV,
    FAST_RETRIES,
    Db,
    RedisServer,
    ec2_client,
    machines_tagged,
    moto_network,
    provisioner,
    redis_server,
    wait_api_state,
)
from tests.support.users import make_user


@pytest.fixture
def outage_redis() -> Iterator[RedisServer]:
    with redis_server() as server:
        yield server


@pytest.fixture
def ec2_env(base_env, moto_url) -> dict[str, str]:
    return {
        **base_env,
        **AWS_ENV,
        **FAST_RETRIES,
        "LOCAL_DEV_MODE": "false",
        "AWS_ENDPOINT_URL": moto_url,
        **moto_network(moto_url),
    }


@pytest.fixture
async def store(database_url, outage_redis) -> AsyncIterator[Db]:
    database = Db(database_url, outage_redis.url)
    yield database
    await database.close()


async def counts(store: Db) -> tuple[int, int]:
    """Instances and outbox commands in the whole database."""
    async with store.sessions() as s:
        instances = await s.scalar(select(func.count()).select_from(Instance))
        commands = await s.scalar(select(func.count()).select_from(OutboxCommand))
    return int(instances or 0), int(commands or 0)


async def test_broker_down_at_create_then_provisioned_when_it_returns(
    ec2_env, outage_redis, moto_url, tmp_path
):
    env = {**ec2_env, "CELERY_BROKER_URL": outage_redis.url}
    with api_process(env, "api-broker-outage") as api_url:
        worker_env = {**env, "PUBLIC_API_URL": api_url}
        with provisioner(worker_env, tmp_path, name="outage-worker"):
            async with api_client(api_url, timeout=30) as client:
                user = await make_user(client)
                outage_redis.stop()
                r = await client.post(
                    "/api/instances", json={"name": "desk", "size": "small"}, headers=user.headers
                )
                assert r.status_code == 202, r.text
                instance_id = r.json()["id"]
                body = await client.get(f"/api/instances/{instance_id}", headers=user.headers)
                assert body.json()["state"] == "pending"

                outage_redis.start()
                await wait_api_state(client, user.headers, instance_id, "running", timeout=90)
    assert len(machines_tagged(ec2_client(moto_url), instance_id, include_gone=True)) == 1


async def test_redis_down_at_create_either_provisions_later_or_writes_nothing(
    ec2_env, outage_redis, store, moto_url, tmp_path
):
    env = {**ec2_env, "REDIS_URL": outage_redis.url, "CELERY_BROKER_URL": outage_redis.url}
    with api_process(env, "api-redis-outage") as api_url:
        worker_env = {**env, "PUBLIC_API_URL": api_url}
        with provisioner(worker_env, tmp_path, name="redis-outage-worker"):
            async with api_client(api_url, timeout=30) as client:
                user = await make_user(client)
                before = await counts(store)
                outage_redis.stop()
                r = await client.post(
                    "/api/instances", json={"name": "desk", "size": "small"}, headers=user.headers
                )
                outage_redis.start()
                if r.status_code == 202:
                    instance_id = r.json()["id"]
                    await wait_api_state(client, user.headers, instance_id, "running", timeout=90)
                    assert (
                        len(machines_tagged(ec2_client(moto_url), instance_id, include_gone=True))
                        == 1
                    )
                    return
    assert r.status_code == 503, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    assert await counts(store) == before
