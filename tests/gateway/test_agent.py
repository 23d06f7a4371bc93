"""The agent channel against a real WebSocket server: frames both ways, close codes both
ways, and the agent credential presented by the gateway, never by the client."""

from __future__ import annotations

import httpx
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from tests.support.gateway import (
    ORIGIN,
    FakeAgent,
    GatewayServer,
    Owner,
    add_instance,
    ticket_for,
    wait_closed,
    ws_connect,
)
from tests.support.waiting import eventually


@pytest.fixture
async def agent_instance(db_engine: AsyncEngine, owner: Owner, agent: FakeAgent):
    instance_id = await add_instance(db_engine, owner.id, agent_port=agent.port)
    agent.allow(instance_id)
    return instance_id


def agent_session(gateway: GatewayServer, owner: Owner, instance_id: object) -> connect:
    """The owner's agent channel to `instance_id`, with a bearer token."""
    return ws_connect(
        f"{gateway.ws_url}/api/instances/{instance_id}/cloudbot", additional_headers=owner.bearer
    )


async def test_text_and_binary_frames_both_ways(
    gateway: GatewayServer, owner: Owner, agent_instance
) -> None:
    async with agent_session(gateway, owner, agent_instance) as ws:
        await ws.send("hello agent")
        assert await ws.recv() == "hello agent"
        await ws.send(b"\x00\x01\xfe\xff")
        assert await ws.recv() == b"\x00\x01\xfe\xff"
        big = bytes(range(256)) * 2048  # 512 KiB, under GATEWAY_MAX_MESSAGE_BYTES
        await ws.send(big)
        assert await ws.recv() == big
        for i in range(50):
            await ws.send(f"message {i}")
        assert [await ws.recv() for _ in range(50)] == [f"message {i}" for i in range(50)]


async def test_the_agents_close_code_reaches_the_client(
    gateway: GatewayServer, owner: Owner, agent_instance
) -> None:
    async with agent_session(gateway, owner, agent_instance) as ws:
        await ws.send("close 4001 agent restarting")
        with pytest.raises(ConnectionClosed):
            await ws.recv()
        await wait_closed(ws)
    assert ws.close_code == 4001
    assert ws.close_reason == "agent restarting"


async def test_the_clients_close_code_reaches_the_agent(
    gateway: GatewayServer, owner: Owner, agent: FakeAgent, agent_instance, http: httpx.AsyncClient
) -> None:
    ticket = await ticket_for(http, owner, agent_instance, "cloudbot")
    closes_before = len(agent.closes)
    async with ws_connect(
        f"{gateway.ws_url}/api/instances/{agent_instance}/cloudbot?ticket={ticket}", origin=ORIGIN
    ) as ws:
        await ws.send("ping")
        assert await ws.recv() == "ping"
        await ws.close(4002, "user closed the tab")
    await eventually(lambda: len(agent.closes) > closes_before, what="the agent to see the close")
    assert agent.closes[-1] == (4002, "user closed the tab")


async def test_the_agent_refuses_anyone_but_the_gateway(agent: FakeAgent, agent_instance) -> None:
    """The stand-in agent really checks the credential (so the tests above prove the gateway
    presented it): a client going straight to it without one is refused."""
    refused_before = agent.refused
    with pytest.raises(Exception, match="401"):
        async with ws_connect(f"ws://127.0.0.1:{agent.port}/ws"):
            pass
    assert agent.refused == refused_before + 1
