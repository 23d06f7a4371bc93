"""Faults on the wire: latency, stalls, dropped connections and a dead peer between the
services and Postgres, Redis and the EC2 endpoint, each through a fault proxy.

Requests answer in bounded time, with a 503 problem document when a peer they need is
away (never a hang, never a 500); nothing is half-written (a create either answered 202
and runs, or answered 503 and left nothing); and the pools recover by themselves once the
peer is back.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Iterator
from dataclasses import dataclass

import httpx
import pytest
from sqlalchemy.engine import make_url
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus
from websockets.typing import Origin

from tests.support.clients import api_client
from tests.support.faultproxy import FaultProxy
from tests.support.harness import (
    AWS_ENV,
    ec2_client,
    machines_tagged,
    moto_network,
    moto_server,
    wait_api_state,
)
from tests.support.supervisor import Supervisor, url_of
from tests.support.users import User, make_user
from tests.support.waiting import eventually

pytestmark = pytest.mark.slow

# Every timeout of the stack is 2 s here; a request may meet a few in a row (the pool's
# ping, a fresh connection, the statement), and must still answer well within this.
BOUND = 12.0
ORIGIN = "http://app.test"  # in ALLOWED_WS_ORIGINS of the test environment


@dataclass
class Wire:
    postgres: FaultProxy
    redis: FaultProxy
    ec2: FaultProxy
    moto: str
    api_url: str
    gateway_url: str

    def peer(self, name: str) -> FaultProxy:
        proxy: FaultProxy = getattr(self, name)
        return proxy


@pytest.fixture(scope="module")
def wire(base_env: dict[str, str], tmp_path_factory) -> Iterator[Wire]:
    pg_url = make_url(base_env["DATABASE_URL"])
    redis_url = make_url(base_env["REDIS_URL"])
    with (
        moto_server() as moto,
        FaultProxy(pg_url.port or 5432) as postgres,
        FaultProxy(redis_url.port or 6379) as redis,
        FaultProxy(make_url(moto).port or 80) as ec2,
    ):
        through_redis = redis_url.set(port=redis.port).render_as_string(hide_password=False)
        env = {
            **base_env,
            **AWS_ENV,
            **moto_network(moto),
            "LOCAL_DEV_MODE": "false",
            "AWS_ENDPOINT_URL": f"http://127.0.0.1:{ec2.port}",
            "DATABASE_URL": pg_url.set(port=postgres.port).render_as_string(hide_password=False),
            "REDIS_URL": through_redis,
            "CELERY_BROKER_URL": through_redis,
            "DATABASE_CONNECT_TIMEOUT_SECONDS": "2",
            "DATABASE_COMMAND_TIMEOUT_SECONDS": "2",
            "DATABASE_POOL_TIMEOUT_SECONDS": "2",
            "REDIS_SOCKET_TIMEOUT_SECONDS": "2",
            "TASK_MAX_RETRIES": "8",
            "TASK_RETRY_BACKOFF_MAX_SECONDS": "1",
            "RATE_LIMIT_ENABLED": "true",
            "RATE_LIMIT_INSTANCE_CREATE": "1000/minute",
            "MAX_LIVE_INSTANCES_PER_USER": "50",
        }
        supervisor = Supervisor(env, tmp_path_factory.mktemp("wire"))
        api = supervisor.api()
        gateway = supervisor.gateway()
        supervisor.worker()
        supervisor.beat()
        with supervisor.running():
            yield Wire(
                postgres,
                redis,
                ec2,
                moto,
                url_of(api),
                f"ws://127.0.0.1:{gateway.env['GATEWAY_PORT']}",
            )


@pytest.fixture
async def client(wire: Wire) -> AsyncIterator[httpx.AsyncClient]:
    for proxy in (wire.postgres, wire.redis, wire.ec2):
        proxy.restore()
    async with api_client(wire.api_url, timeout=BOUND * 3) as c:
        yield c


async def timed(request: Awaitable[httpx.Response]) -> tuple[httpx.Response, float]:
    start = time.monotonic()
    response = await request
    return response, time.monotonic() - start


def assert_unavailable(r: httpx.Response) -> None:
    assert r.status_code == 503, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    assert r.json()["code"] == "dependency_unavailable"
    assert "Retry-After" in r.headers


async def create(client: httpx.AsyncClient, user: User) -> httpx.Response:
    return await client.post(
        "/api/instances", json={"name": "wire", "size": "small"}, headers=user.headers
    )


async def instance_ids(client: httpx.AsyncClient, user: User) -> list[str]:
    r = await client.get("/api/instances", headers=user.headers)
    assert r.status_code == 200, r.text
    body = r.json()
    items = body["items"] if isinstance(body, dict) else body
    return sorted(str(i["id"]) for i in items)


async def recovered(client: httpx.AsyncClient, user: User) -> None:
    """The pools recover by themselves: requests succeed again shortly."""

    async def ok() -> bool:
        return (await client.get("/api/instances", headers=user.headers)).status_code == 200

    await eventually(ok, BOUND, "the API to recover")


async def all_run(wire: Wire, client: httpx.AsyncClient, user: User, ids: list[str]) -> None:
    ec2 = ec2_client(wire.moto)
    for instance_id in ids:
        await wait_api_state(client, user.headers, instance_id, "running", timeout=60)

        def one_machine(i: str = instance_id) -> bool:
            return len(machines_tagged(ec2, i)) == 1

        await eventually(one_machine, 30, "one machine")


@pytest.mark.parametrize("peer", ["postgres", "redis"])
async def test_latency_slows_but_breaks_nothing(wire, client, peer):
    user = await make_user(client)
    wire.peer(peer).set_latency(0.05)
    r = await create(client, user)
    assert r.status_code == 202, r.text
    await all_run(wire, client, user, [str(r.json()["id"])])


@pytest.mark.parametrize("fault", ["stall", "dead"])
@pytest.mark.parametrize("peer", ["postgres", "redis"])
async def test_a_stalled_or_dead_peer_gives_a_prompt_503_and_nothing_half_written(
    wire, client, peer, fault
):
    user = await make_user(client)
    before = await instance_ids(client, user)
    proxy = wire.peer(peer)
    proxy.stall() if fault == "stall" else proxy.kill()
    try:
        answers = await asyncio.gather(
            *(timed(create(client, user)) for _ in range(3)),
            timed(client.get("/api/instances", headers=user.headers)),
            timed(client.get("/readyz")),
        )
    finally:
        proxy.restore()
    for r, took in answers:
        assert took < BOUND, f"{r.request.method} {r.request.url.path} took {took:.1f} s"
        if r.request.url.path == "/readyz":
            assert r.status_code == 503, r.text
        elif r.status_code not in (200, 202):  # a request that did not need the peer
            assert_unavailable(r)
    assert any(r.status_code == 503 for r, _ in answers[:3]), "the fault did not bite"
    await recovered(client, user)
    # Whatever answered 202 runs; whatever answered 503 left nothing behind.
    accepted = sorted(str(r.json()["id"]) for r, _ in answers[:3] if r.status_code == 202)
    assert sorted(set(await instance_ids(client, user)) - set(before)) == accepted
    await all_run(wire, client, user, accepted)


@pytest.mark.parametrize("peer", ["postgres", "redis"])
async def test_dropped_connections_are_replaced(wire, client, peer):
    user = await make_user(client)
    r = await create(client, user)
    assert r.status_code == 202, r.text
    first = str(r.json()["id"])
    wire.peer(peer).cut()
    # The pool finds the dead connections (pre-ping, the client's retry) before use.
    answers = [await create(client, user) for _ in range(3)]
    for answer in answers:
        assert answer.status_code in (202, 503), answer.text
        if answer.status_code == 503:
            assert_unavailable(answer)
    assert answers[-1].status_code == 202, answers[-1].text
    accepted = [first, *(str(a.json()["id"]) for a in answers if a.status_code == 202)]
    await all_run(wire, client, user, accepted)


async def test_ec2_latency_and_dropped_calls(wire, client):
    """The worker's EC2 calls: slow ones get through; calls cut mid-way are retried, and
    the launch still makes one machine that runs."""
    user = await make_user(client)
    wire.ec2.set_latency(0.1)
    r = await create(client, user)
    assert r.status_code == 202, r.text
    slow = str(r.json()["id"])

    wire.ec2.set_latency(0)
    calls_before = wire.ec2.accepted
    wire.ec2.stall()
    r = await create(client, user)
    assert r.status_code == 202, r.text
    cut = str(r.json()["id"])
    await eventually(lambda: wire.ec2.accepted > calls_before, 10, "an EC2 call")
    await asyncio.sleep(1.0)
    wire.ec2.cut()
    wire.ec2.flow()
    await all_run(wire, client, user, [slow, cut])


@pytest.mark.parametrize("peer", ["postgres", "redis"])
async def test_the_gateway_refuses_promptly_with_a_503_when_a_peer_stalls(wire, client, peer):
    """Before the handshake, in the problem shape: the gateway's lookups are bounded too."""
    user = await make_user(client)
    r = await create(client, user)
    assert r.status_code == 202, r.text
    instance_id = str(r.json()["id"])
    await all_run(wire, client, user, [instance_id])
    url = f"{wire.gateway_url}/api/instances/{instance_id}/vnc"
    with wire.peer(peer).stalled():
        start = time.monotonic()
        with pytest.raises(InvalidStatus) as refused:
            async with connect(
                url, additional_headers=user.headers, origin=Origin(ORIGIN), open_timeout=BOUND
            ):
                pass
        took = time.monotonic() - start
    assert took < BOUND, f"the gateway took {took:.1f} s"
    response = refused.value.response
    assert response.status_code == 503, response.body
    assert response.headers["Content-Type"].startswith("application/problem+json")
