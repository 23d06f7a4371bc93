"""The kill matrix: each service of the stack, and each of its peers, SIGKILLed at three
points of an instance's launch, then brought back only as a process supervisor would.

One stack serves every cell (an API, a worker with two children, a beat, a Redis of its
own, Postgres behind a fault proxy, moto behind the EC2 fault proxy), each cell with its
own user and instance. A cell holds the instance's EC2 call at its point in the proxy,
kills its victim, releases the call, restarts what died, and lets the system settle. Then
the invariants: the accepted create has exactly one machine and it runs; the stop and
delete accepted afterwards are carried out; Postgres and EC2 agree; every command is
complete; no secret is in Redis (which holds every queued task's arguments).

"Postgres killed" cuts every connection and refuses new ones for a moment (the proxy in
front of it), which is what the services see when Postgres crashes and restarts; the
shared test Postgres itself keeps running.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from redis import Redis
from sqlalchemy.engine import make_url

from tests.support.clients import api_client
from tests.support.faultproxy import FaultProxy
from tests.support.harness import (
    AWS_ENV,
    TOKEN,
    Db,
    Ec2FaultProxy,
    RedisServer,
    ec2_client,
    machines_tagged,
    moto_network,
    moto_server,
    user_data_of,
    wait_api_state,
)
from tests.support.leaks import SecretRegistry, redis_leaks
from tests.support.processes import LOG_DIR, wait_for
from tests.support.supervisor import Supervisor, pid_of_connection, url_of, wait_dead
from tests.support.users import make_user
from tests.support.waiting import eventually

pytestmark = pytest.mark.slow

VICTIMS = ["api", "worker-child", "worker", "beat", "redis", "postgres"]
PHASES = ["before-launch", "after-launch-before-commit", "after-commit"]
SETTLE = 60


@dataclass
class Stack:
    supervisor: Supervisor
    ec2: Ec2FaultProxy
    moto: str
    redis: RedisServer
    postgres: FaultProxy
    db: Db

    @property
    def api_url(self) -> str:
        return url_of(self.supervisor["api"])


@pytest.fixture(scope="module")
def stack(base_env: dict[str, str], database_url: str, tmp_path_factory) -> Iterator[Stack]:
    url = make_url(database_url)
    redis = RedisServer()
    redis.start()
    with (
        moto_server() as moto,
        Ec2FaultProxy(moto) as ec2,
        FaultProxy(url.port or 5432) as postgres,
    ):
        env = {
            **base_env,
            **AWS_ENV,
            **moto_network(moto),
            "LOCAL_DEV_MODE": "false",
            "AWS_ENDPOINT_URL": ec2.url,
            "DATABASE_URL": url.set(port=postgres.port).render_as_string(hide_password=False),
            "REDIS_URL": redis.url,
            "CELERY_BROKER_URL": redis.url,
            "TASK_MAX_RETRIES": "8",
            "TASK_RETRY_BACKOFF_MAX_SECONDS": "1",
            "OUTBOX_RELAY_AFTER_SECONDS": "3",
            "RECONCILE_INTERVAL_SECONDS": "2",
            "BEAT_LOCK_TTL_SECONDS": "3",
            "RATE_LIMIT_ENABLED": "false",
        }
        supervisor = Supervisor(env, tmp_path_factory.mktemp("matrix"))
        supervisor.api()
        supervisor.worker()
        supervisor.beat()
        db = Db(database_url, redis.url)
        try:
            with supervisor.running():
                yield Stack(supervisor, ec2, moto, redis, postgres, db)
        finally:
            asyncio.run(db.close())
            redis.stop()


def _hold(stack: Stack, phase: str) -> Any:
    """Hold the instance's EC2 call at the cell's point; returns its release."""
    if phase == "before-launch":
        return stack.ec2.hold("RunInstances", before=True, answer=True)
    if phase == "after-launch-before-commit":
        return stack.ec2.hold("RunInstances", answer=True)
    # The first look at the launched machine comes after its id was committed.
    launched: Callable[[bytes], bool] = lambda body: any(  # noqa: E731
        m.encode() in body for m in stack.ec2.launched
    )
    return stack.ec2.hold("DescribeInstances", before=True, answer=True, matching=launched)


def _kill(stack: Stack, victim: str) -> Callable[[], object]:
    """SIGKILL the victim; returns what the supervisor does about it."""
    sup = stack.supervisor
    if victim == "worker-child":
        # The pool child making the held call; the worker's main process replaces it.
        assert stack.ec2.held_client is not None
        pid = pid_of_connection(stack.ec2.held_client[1])
        assert pid is not None
        assert pid != sup["worker"].proc.pid  # type: ignore[union-attr]
        os.kill(pid, signal.SIGKILL)
        wait_dead(pid)
        return lambda: None
    if victim == "worker":
        sup["worker"].kill()
        return lambda: sup["worker"].restart()
    if victim in ("api", "beat"):
        sup[victim].kill()
        return lambda: sup[victim].restart()
    if victim == "redis":
        stack.redis.kill()
        return stack.redis.start
    stack.postgres.kill()
    return stack.postgres.restore


async def _settled_running(stack: Stack, client: httpx.AsyncClient, user, instance_id: str):
    # Right after Postgres comes back, the first statement on each dead pooled connection
    # fails and the API answers 503 (the pool is then renewed): recovery, not a failure.
    await wait_api_state(
        client, user.headers, instance_id, "running", timeout=SETTLE, recovering=True
    )
    ec2 = ec2_client(stack.moto)
    # The reconciler ends any second machine a relaunch made (moto ignores ClientToken).
    await asyncio.to_thread(
        wait_for, lambda: len(machines_tagged(ec2, instance_id)) == 1, SETTLE, "one machine"
    )
    [machine] = machines_tagged(ec2, instance_id)
    row = await stack.db.instance(uuid.UUID(instance_id))
    assert row.backend_instance_id == machine["InstanceId"]
    assert machine["State"]["Name"] == "running"
    return row


def _record(victim: str, phase: str, settled_after: float, launches: int) -> None:
    """A line of the README's table: how long the cell took to run again, and how many
    machines EC2 was asked for (a second one is a relaunch the reconciler cleaned up)."""
    LOG_DIR.mkdir(exist_ok=True)
    with (LOG_DIR / "kill-matrix.txt").open("a") as out:
        out.write(f"{victim}\t{phase}\t{settled_after:.1f}\t{launches}\n")


async def _no_open_commands(stack: Stack, instance_id: str) -> bool:
    return await stack.db.open_commands(uuid.UUID(instance_id)) == 0


@pytest.mark.parametrize("phase", PHASES)
@pytest.mark.parametrize("victim", VICTIMS)
async def test_kill(stack: Stack, victim: str, phase: str, secret_registry: SecretRegistry):
    stack.ec2.reset()
    async with api_client(stack.api_url, timeout=30) as client:
        user = await make_user(client)
        provider_key = "sk-ant-" + secrets.token_urlsafe(32)
        secret_registry.add(provider_key)
        r = await client.post(
            "/api/user/api-keys",
            json={"provider": "anthropic", "key": provider_key},
            headers=user.headers,
        )
        assert r.status_code == 201, r.text

        release = _hold(stack, phase)
        r = await client.post(
            "/api/instances", json={"name": "desk", "size": "small"}, headers=user.headers
        )
        assert r.status_code == 202, r.text
        instance_id = str(r.json()["id"])
        assert await asyncio.to_thread(stack.ec2.held.wait, 30), "the EC2 call never came"

        killed_at = time.monotonic()
        recover = await asyncio.to_thread(_kill, stack, victim)
        release.set()
        await asyncio.sleep(0.5)
        await asyncio.to_thread(recover)

    # A fresh client: the API may be a new process. As a balancer would, it waits for the
    # API to be ready: after Postgres came back, its first statement on a pooled connection
    # finds that connection dead, answers 503 (Retry-After) and renews the pool.
    async with api_client(stack.api_url, timeout=30) as client:

        async def ready() -> bool:
            return (await client.get("/readyz")).status_code == 200

        await eventually(ready, SETTLE, "the API to be ready")
        row = await _settled_running(stack, client, user, instance_id)
        _record(victim, phase, time.monotonic() - killed_at, len(stack.ec2.launched))
        ec2 = ec2_client(stack.moto)
        secret_registry.add(*TOKEN.findall(user_data_of(ec2, row.backend_instance_id)))

        # Every command accepted after the fault is carried out too.
        r = await client.post(f"/api/instances/{instance_id}/stop", headers=user.headers)
        assert r.status_code == 202, r.text
        await wait_api_state(client, user.headers, instance_id, "stopped", timeout=SETTLE)
        [machine] = machines_tagged(ec2, instance_id)
        assert machine["State"]["Name"] == "stopped"
        r = await client.delete(f"/api/instances/{instance_id}", headers=user.headers)
        assert r.status_code == 202, r.text
        await wait_api_state(client, user.headers, instance_id, "terminated", timeout=SETTLE)

    await eventually(lambda: _no_open_commands(stack, instance_id), SETTLE, "every command done")
    assert machines_tagged(ec2, instance_id) == [], "a machine outlived its deleted instance"
    leaks = redis_leaks(Redis.from_url(stack.redis.url), secret_registry.values)
    assert leaks == [], leaks
