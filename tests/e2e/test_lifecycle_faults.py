"""Faults through the whole stack (API, worker, Postgres, a moto server behind a
fault-injecting proxy): a worker SIGKILLed mid-provision, throttling, no capacity."""

from __future__ import annotations

import asyncio
import os
import signal
import uuid
from collections.abc import Iterator

import httpx
import pytest
from sqlalchemy import select
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool

from cloudbot_common.models import Instance
from cloudbot_common.security.opaque import token_digest
from tests.support.api import api_process
from tests.support.harness import (
    AWS_ENV,
    FAST_RETRIES,
    TOKEN,
    Ec2FaultProxy,
    ec2_client,
    machines_tagged,
    moto_network,
    provisioner,
    user_data_of,
    wait_api_state,
)
from tests.support.processes import wait_for
from tests.support.users import make_user


@pytest.fixture(scope="module")
def proxy(moto_url) -> Iterator[Ec2FaultProxy]:
    with Ec2FaultProxy(moto_url) as p:
        yield p


@pytest.fixture(autouse=True)
def _fresh_proxy(proxy):
    proxy.reset()


@pytest.fixture(scope="module")
def env(base_env, broker_url, proxy, moto_url) -> dict[str, str]:
    return {
        **base_env,
        **AWS_ENV,
        **FAST_RETRIES,
        "CELERY_BROKER_URL": broker_url,
        "LOCAL_DEV_MODE": "false",
        "AWS_ENDPOINT_URL": proxy.url,
        **moto_network(moto_url),
    }


@pytest.fixture(scope="module")
def api_url(env) -> Iterator[str]:
    with api_process(env, "api-faults") as url:
        yield url


async def create(client: httpx.AsyncClient, headers: dict[str, str]) -> str:
    r = await client.post("/api/instances", json={"name": "desk", "size": "small"}, headers=headers)
    assert r.status_code == 202, r.text
    return str(r.json()["id"])


async def launched_by_a_worker_that_dies(client, user, worker_env, proxy, tmp_path) -> str:
    """A new instance whose worker is SIGKILLed once moto has made the machine, before the
    answer reaches it (held until the worker is dead). Returns the instance's id."""
    release = proxy.hold("RunInstances")
    with provisioner(worker_env, tmp_path, name="e2e-doomed-worker") as doomed:
        instance_id = await create(client, user.headers)
        assert await asyncio.to_thread(proxy.held.wait, 30)
        doomed.kill(signal.SIGKILL)
        doomed.popen.wait(10)
    release.set()
    return instance_id


async def test_worker_sigkilled_mid_provision(client, env, api_url, proxy, moto_url, tmp_path):
    user = await make_user(client)
    worker_env = {**env, "PUBLIC_API_URL": api_url}
    instance_id = await launched_by_a_worker_that_dies(client, user, worker_env, proxy, tmp_path)
    assert (await client.get(f"/api/instances/{instance_id}", headers=user.headers)).json()[
        "state"
    ] == "provisioning"

    with provisioner(worker_env, tmp_path, name="e2e-next-worker"):
        await wait_api_state(client, user.headers, instance_id, "running")
    assert len(machines_tagged(ec2_client(moto_url), instance_id, include_gone=True)) == 1
    assert proxy.calls["RunInstances"] == 1


async def test_a_relaunch_that_cannot_see_the_first_machine_keeps_its_token(
    client, env, api_url, proxy, moto_url, tmp_path, secret_registry
):
    """EC2 lists a new machine late. A worker dies after launching; the next one's tag
    lookup finds nothing, so it launches again. That launch must carry the same bootstrap
    token, hence the same ClientToken, with which EC2 hands back the first machine: a
    fresh token would leave that machine unable ever to bootstrap."""
    user = await make_user(client)
    worker_env = {**env, "PUBLIC_API_URL": api_url}
    instance_id = await launched_by_a_worker_that_dies(client, user, worker_env, proxy, tmp_path)
    proxy.blind(instance_id)  # the next tag lookup for this instance sees no machine

    with provisioner(worker_env, tmp_path, name="e2e-relaunching-worker"):
        await wait_api_state(client, user.headers, instance_id, "running")
    first, second = proxy.requests["RunInstances"]
    assert first["ClientToken"] == second["ClientToken"]
    # moto ignores ClientToken and made a second machine; both carry the one token, whose
    # digest is the row's.
    ec2 = ec2_client(moto_url)
    machines = machines_tagged(ec2, instance_id, include_gone=True)
    assert len(machines) == 2
    tokens = {t for m in machines for t in TOKEN.findall(user_data_of(ec2, m["InstanceId"]))}
    assert len(tokens) == 1
    secret_registry.add(*tokens)
    engine = create_async_engine(env["DATABASE_URL"], poolclass=NullPool)
    async with engine.connect() as conn:
        stored = await conn.scalar(
            select(Instance.bootstrap_token_hash).where(Instance.id == uuid.UUID(instance_id))
        )
    await engine.dispose()
    assert stored == token_digest(tokens.pop())


async def test_worker_sigterm_finishes_the_step_under_way(
    client, env, api_url, proxy, moto_url, tmp_path
):
    """A warm shutdown: the worker stops taking work but finishes the EC2 call it is in."""
    user = await make_user(client)
    worker_env = {**env, "PUBLIC_API_URL": api_url}
    release = proxy.hold("RunInstances")
    with provisioner(worker_env, tmp_path, name="e2e-stopping-worker") as stopping:
        instance_id = await create(client, user.headers)
        assert await asyncio.to_thread(proxy.held.wait, 30)
        os.kill(stopping.pid, signal.SIGTERM)
        await asyncio.sleep(1)
        assert stopping.alive(), "the worker must wait for the task under way"
        release.set()
        await asyncio.to_thread(stopping.popen.wait, 30)
        assert stopping.popen.returncode == 0
    # The stopping worker finished its step before exiting: its launch got through (on
    # botocore's retry, the held answer never came) and the machine is on the row.
    assert proxy.calls["RunInstances"] == 2
    engine = create_async_engine(env["DATABASE_URL"], poolclass=NullPool)
    async with engine.connect() as conn:
        recorded = await conn.scalar(
            select(Instance.backend_instance_id).where(Instance.id == uuid.UUID(instance_id))
        )
    await engine.dispose()
    assert recorded is not None
    with provisioner(worker_env, tmp_path, name="e2e-after-worker"):
        await wait_api_state(client, user.headers, instance_id, "running")
        # botocore's retry carried the same ClientToken: EC2 would return the first
        # machine; moto made a second one, which the reconciler terminates (no row owns it).
        ec2 = ec2_client(moto_url)
        await asyncio.to_thread(
            wait_for, lambda: len(machines_tagged(ec2, instance_id)) == 1, 30, "one machine"
        )


async def test_throttling_and_no_capacity_are_retried_then_fail_with_a_reason(
    client, env, api_url, proxy, moto_url, tmp_path
):
    user = await make_user(client)
    with provisioner({**env, "PUBLIC_API_URL": api_url}, tmp_path, name="e2e-retry-worker"):
        for code, status, words in (
            ("RequestLimitExceeded", 503, "EC2 is throttling requests"),
            ("InsufficientInstanceCapacity", 500, "EC2 has no capacity"),
        ):
            proxy.reset()
            proxy.fail("RunInstances", code, status)
            instance_id = await create(client, user.headers)
            body = await wait_api_state(client, user.headers, instance_id, "failed", timeout=60)
            assert words in body["state_reason"]
            assert "Gave up after 3 attempts" in body["state_reason"]
            # Each of the three attempts reached EC2 (botocore adds one quick retry).
            assert proxy.calls["RunInstances"] >= 3
            assert machines_tagged(ec2_client(moto_url), instance_id) == []
