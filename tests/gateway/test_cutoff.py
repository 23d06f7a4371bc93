"""Live sessions end promptly when their instance leaves `running` or their login ends."""

from __future__ import annotations

import uuid

import httpx
import pytest
from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import AsyncEngine
from websockets.exceptions import ConnectionClosed

from cloudbot_common.models import InstanceState as S
from tests.support.gateway import (
    ORIGIN,
    Desktop,
    FakeAgent,
    GatewayServer,
    Owner,
    add_instance,
    refused,
    ticket_for,
    wait_closed,
    ws_connect,
)
from tests.support.instances import move
from tests.support.waiting import eventually


@pytest.fixture
async def instance(
    db_engine: AsyncEngine, owner: Owner, desktop: Desktop, agent: FakeAgent
) -> uuid.UUID:
    instance_id = await add_instance(
        db_engine, owner.id, vnc_port=desktop.vnc_port, agent_port=agent.port
    )
    agent.allow(instance_id)
    return instance_id


async def test_sessions_end_when_the_instance_stops(
    gateway: GatewayServer,
    db_engine: AsyncEngine,
    redis: Redis,
    owner: Owner,
    agent: FakeAgent,
    instance: uuid.UUID,
) -> None:
    base = f"{gateway.ws_url}/api/instances/{instance}"
    async with (
        ws_connect(f"{base}/vnc", additional_headers=owner.bearer) as vnc,
        ws_connect(f"{base}/cloudbot", additional_headers=owner.bearer) as bot,
    ):
        assert (await vnc.recv())[:4] == b"RFB "
        await bot.send("still there?")
        assert await bot.recv() == "still there?"
        closes_before = len(agent.closes)

        await move(db_engine, redis, instance, S.STOPPING)

        await wait_closed(vnc)
        await wait_closed(bot)
    assert (vnc.close_code, vnc.close_reason) == (1001, "instance stopping")
    assert (bot.close_code, bot.close_reason) == (1001, "instance stopping")
    await eventually(lambda: len(agent.closes) > closes_before, what="the agent side to be closed")
    assert agent.closes[-1][0] == 1001

    # Refused again now that the row is no longer running.
    response = await refused(f"{base}/vnc", additional_headers=owner.bearer)
    assert response.status_code == 409

    await move(db_engine, redis, instance, S.STOPPED, S.STARTING, S.RUNNING)
    async with ws_connect(f"{base}/vnc", additional_headers=owner.bearer) as vnc:
        assert (await vnc.recv())[:4] == b"RFB "


async def test_sessions_end_when_the_instance_is_terminated(
    gateway: GatewayServer, db_engine: AsyncEngine, redis: Redis, owner: Owner, instance: uuid.UUID
) -> None:
    async with ws_connect(
        f"{gateway.ws_url}/api/instances/{instance}/vnc", additional_headers=owner.bearer
    ) as vnc:
        await vnc.recv()
        await move(db_engine, redis, instance, S.TERMINATING)
        await wait_closed(vnc)
    assert vnc.close_code == 1001


async def test_sessions_end_when_the_user_logs_out(
    gateway: GatewayServer, owner: Owner, instance: uuid.UUID, http: httpx.AsyncClient
) -> None:
    ticket = await ticket_for(http, owner, instance, "cloudbot")
    async with (
        ws_connect(
            f"{gateway.ws_url}/api/instances/{instance}/cloudbot?ticket={ticket}", origin=ORIGIN
        ) as bot,
        ws_connect(
            f"{gateway.ws_url}/api/instances/{instance}/vnc", additional_headers=owner.bearer
        ) as vnc,
    ):
        await bot.send("hi")
        assert await bot.recv() == "hi"
        await vnc.recv()

        r = await http.post("/api/auth/logout", headers=owner.bearer)
        assert r.status_code == 204, r.text

        await wait_closed(bot)
        await wait_closed(vnc)
        with pytest.raises(ConnectionClosed):
            await bot.send("anyone?")
    assert bot.close_code == vnc.close_code == 1008
    # And the ended login's access token opens nothing any more.
    response = await refused(
        f"{gateway.ws_url}/api/instances/{instance}/vnc", additional_headers=owner.bearer
    )
    assert response.status_code == 401
