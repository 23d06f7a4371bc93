"""Personal access tokens at the gateway: a write token opens the owner's agent channel as
a Bearer credential; a read token, another user's token and a revoked one are refused, and
revoking a token closes the sessions opened with it at once."""

from __future__ import annotations

import uuid

import httpx
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine
from websockets.exceptions import ConnectionClosed

from tests.support.gateway import (
    FakeAgent,
    GatewayServer,
    Owner,
    add_instance,
    personal_token,
    refused,
    wait_closed,
    ws_connect,
)
from tests.support.users import make_user
from tests.support.waiting import eventually


@pytest.fixture
async def agent_instance(db_engine: AsyncEngine, owner: Owner, agent: FakeAgent) -> uuid.UUID:
    instance_id = await add_instance(db_engine, owner.id, agent_port=agent.port)
    agent.allow(instance_id)
    return instance_id


async def test_a_token_opens_the_agent_channel_and_its_revocation_closes_it(
    gateway: GatewayServer,
    http: httpx.AsyncClient,
    owner: Owner,
    agent_instance: uuid.UUID,
    db_engine: AsyncEngine,
) -> None:
    token = await personal_token(http, owner.bearer, "write")
    url = f"{gateway.ws_url}/api/instances/{agent_instance}/cloudbot"
    bearer = {"Authorization": f"Bearer {token['token']}"}

    async with ws_connect(url, additional_headers=bearer) as ws:
        await ws.send("hello through a token")
        assert await ws.recv() == "hello through a token"

        r = await http.delete(f"/api/user/tokens/{token['id']}", headers=owner.bearer)
        assert r.status_code == 204
        await wait_closed(ws)
        with pytest.raises(ConnectionClosed):
            await ws.send("still there?")

    response = await refused(url, additional_headers=bearer)
    assert response.status_code == 401

    async def audited() -> bool:
        r = await http.get("/api/user/audit", headers=owner.bearer)
        actions = [
            (e["action"], e["details"].get("via"))
            for e in r.json()["items"]
            if e["target"] == f"instance:{agent_instance}"
        ]
        return ("gateway.session_opened", "token") in actions and (
            "gateway.session_closed",
            "token",
        ) in actions

    await eventually(audited, 10, "the session in the audit log")


async def test_read_tokens_and_other_users_tokens_are_refused(
    gateway: GatewayServer, http: httpx.AsyncClient, owner: Owner, agent_instance: uuid.UUID
) -> None:
    url = f"{gateway.ws_url}/api/instances/{agent_instance}/cloudbot"
    read = await personal_token(http, owner.bearer, "read")
    response = await refused(url, additional_headers={"Authorization": f"Bearer {read['token']}"})
    assert response.status_code == 403

    stranger = await make_user(http)
    theirs = await personal_token(http, stranger.headers, "write")
    response = await refused(url, additional_headers={"Authorization": f"Bearer {theirs['token']}"})
    assert response.status_code == 404  # the same as for a machine that does not exist

    forged = "cbp_" + "A" * 43
    response = await refused(url, additional_headers={"Authorization": f"Bearer {forged}"})
    assert response.status_code == 401
