"""Revocation fails closed: when Redis will not take a revoked session's marker, logout
and refresh-reuse detection do not report success, and the access token and the gateway
sessions of the ended login stop all the same (from Postgres's revoked_at); when Redis is
away altogether, the checks ask Postgres.

The API and the gateway here talk to Redis through a fault proxy that can refuse the
marker's write while everything else goes through."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from urllib.parse import urlsplit

import httpx
import pytest
from redis.asyncio import Redis
from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncEngine

from cloudbot_common.events import revoked_session_key
from cloudbot_common.models import LoginSession
from cloudbot_common.settings import Settings
from tests.support.clients import api_client
from tests.support.faultproxy import FaultProxy
from tests.support.gateway import (
    Desktop,
    GatewayServer,
    add_instance,
    gateway_env,
    make_owner,
    personal_token,
    refused,
    run_gateway,
    wait_closed,
    ws_connect,
)
from tests.support.leaks import SECRETS
from tests.support.processes import PYTHON, free_port, http_ok, running
from tests.support.redis_fault import RedisWriteFaults

MARKER = b"revoked-session"


@dataclass(frozen=True)
class Faulty:
    proxy: FaultProxy
    faults: RedisWriteFaults
    api: str
    gateway: GatewayServer


@pytest.fixture(scope="module")
def faulty(base_env: dict[str, str], redis_url: str) -> Iterator[Faulty]:
    """An API and a gateway whose Redis is behind the fault proxy."""
    parts = urlsplit(redis_url)
    faults = RedisWriteFaults()
    proxy = FaultProxy(parts.port or 6379)
    proxy.upstream_filter = faults.filter
    with proxy:
        env = {**base_env, "REDIS_URL": f"redis://127.0.0.1:{proxy.port}{parts.path}"}
        port = free_port()
        api = f"http://127.0.0.1:{port}"
        api_env = {**env, "API_PORT": str(port), "PUBLIC_API_URL": api}
        with running(
            "api-redis-faults",
            [PYTHON, "-m", "cloudbot_api"],
            api_env,
            ready=http_ok(f"{api}/healthz"),
        ):
            gateway_port = free_port()
            yield from (
                Faulty(proxy, faults, api, gateway)
                for gateway in run_gateway(
                    "gateway-redis-faults", gateway_env(env, gateway_port), gateway_port
                )
            )


@pytest.fixture
async def client(faulty: Faulty) -> AsyncIterator[httpx.AsyncClient]:
    faulty.faults.refuse_writes_to = None
    async with api_client(faulty.api) as http:
        yield http
    faulty.faults.refuse_writes_to = None
    faulty.proxy.restore()


async def revoked_at(db_engine: AsyncEngine, session_id: uuid.UUID) -> tuple[object, object]:
    async with db_engine.connect() as conn:
        row = (
            await conn.execute(
                select(LoginSession.revoked_at, LoginSession.revocation_announced_at).where(
                    LoginSession.id == session_id
                )
            )
        ).one()
    return row[0], row[1]


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.2)


async def test_logout_fails_closed_when_the_marker_cannot_be_written(
    faulty: Faulty,
    client: httpx.AsyncClient,
    db_engine: AsyncEngine,
    redis: Redis,
    desktop: Desktop,
    settings: Settings,
) -> None:
    owner = await make_owner(client, settings)
    instance_id = await add_instance(db_engine, owner.id, vnc_port=desktop.vnc_port)
    url = f"{faulty.gateway.ws_url}/api/instances/{instance_id}/vnc"
    async with ws_connect(url, additional_headers=owner.bearer) as ws:
        greeting = await ws.recv()
        assert isinstance(greeting, bytes)
        assert greeting.startswith(b"RFB")

        faulty.faults.refuse_writes_to = MARKER
        r = await client.post("/api/auth/logout", headers=owner.bearer)
        # Not 204: the session is ended in Postgres, but not every service has heard.
        assert r.status_code == 503, r.text
        assert r.json()["code"] == "revocation_pending"
        assert faulty.faults.refused >= 1
        revoked, announced_at = await revoked_at(db_engine, owner.session_id)
        assert revoked is not None
        assert announced_at is None
        assert not await redis.exists(revoked_session_key(owner.session_id))

        # Refused all the same: by the API at once, and the live desktop session ends.
        me = await client.get("/api/auth/me", headers=owner.bearer)
        assert me.status_code == 401, me.text
        await wait_closed(ws, timeout=15)
        assert ws.close_code == 1008
    refusal = await refused(url, additional_headers=owner.bearer)
    assert refusal.status_code == 401

    # Once Redis takes writes again, the marker is written and the row says so.
    faulty.faults.refuse_writes_to = None

    async def announced() -> bool:
        return bool(await redis.exists(revoked_session_key(owner.session_id)))

    await eventually(announced)
    await eventually(lambda: _announced_in_db(db_engine, owner.session_id))


async def _announced_in_db(db_engine: AsyncEngine, session_id: uuid.UUID) -> bool:
    return (await revoked_at(db_engine, session_id))[1] is not None


async def test_refresh_reuse_fails_closed_when_the_marker_cannot_be_written(
    faulty: Faulty, client: httpx.AsyncClient, db_engine: AsyncEngine, settings: Settings
) -> None:
    owner = await make_owner(client, settings)
    first = owner.user.refresh_token
    r = await client.post("/api/auth/refresh", json={"refresh_token": first})
    assert r.status_code == 200, r.text
    second = r.json()
    SECRETS.add(second["access_token"], second["refresh_token"])

    faulty.faults.refuse_writes_to = MARKER
    # The used token again, from another client: reuse.
    other = await api_client_reuse(faulty.api, first)
    assert other.status_code == 503, other.text
    assert other.json()["code"] == "revocation_pending"
    assert (await revoked_at(db_engine, owner.session_id))[0] is not None
    for token in (second["access_token"], owner.user.access_token):
        me = await client.get("/api/auth/me", headers={"Authorization": f"Bearer {token}"})
        assert me.status_code == 401, me.text


async def api_client_reuse(url: str, refresh_token: str) -> httpx.Response:
    """The refresh token presented again from another client (another address)."""
    async with api_client(url) as other:
        return await other.post("/api/auth/refresh", json={"refresh_token": refresh_token})


async def test_token_revocation_fails_closed_when_the_marker_cannot_be_written(
    faulty: Faulty,
    client: httpx.AsyncClient,
    db_engine: AsyncEngine,
    desktop: Desktop,
    settings: Settings,
) -> None:
    """Revoking a personal access token whose marker Redis will not take answers 503, not
    204: the API refuses the token at once, and the desktop session opened with it ends
    at the gateway's next re-check of its sessions in Postgres."""
    owner = await make_owner(client, settings)
    instance_id = await add_instance(db_engine, owner.id, vnc_port=desktop.vnc_port)
    token = await personal_token(client, owner.bearer, "write")
    bearer = {"Authorization": f"Bearer {token['token']}"}
    url = f"{faulty.gateway.ws_url}/api/instances/{instance_id}/vnc"
    async with ws_connect(url, additional_headers=bearer) as ws:
        greeting = await ws.recv()
        assert isinstance(greeting, bytes)
        assert greeting.startswith(b"RFB")

        faulty.faults.refuse_writes_to = MARKER
        r = await client.delete(f"/api/user/tokens/{token['id']}", headers=owner.bearer)
        assert r.status_code == 503, r.text
        assert r.json()["code"] == "revocation_pending"
        assert faulty.faults.refused >= 1
        listed = await client.get("/api/instances", headers=bearer)
        assert listed.status_code == 401, listed.text
        await wait_closed(ws, timeout=45)
        assert ws.close_code == 1008
    refusal = await refused(url, additional_headers=bearer)
    assert refusal.status_code == 401


async def test_checks_fall_back_to_postgres_while_redis_is_away(
    faulty: Faulty, client: httpx.AsyncClient, db_engine: AsyncEngine, settings: Settings
) -> None:
    ended = await make_owner(client, settings)
    alive = await make_owner(client, settings)
    # Revoked, and announced, but the marker is gone (Redis restarted without it).
    async with db_engine.begin() as conn:
        await conn.execute(
            update(LoginSession)
            .where(LoginSession.id == ended.session_id)
            .values(
                revoked_at=LoginSession.created_at, revocation_announced_at=LoginSession.created_at
            )
        )
    faulty.proxy.kill()  # Redis is away: connections reset, new ones refused
    me = await client.get("/api/auth/me", headers=ended.bearer)
    assert me.status_code == 401, me.text
    me = await client.get("/api/auth/me", headers=alive.bearer)
    assert me.status_code == 200, me.text
