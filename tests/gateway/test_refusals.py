"""Every refusal is decided before the handshake completes, with its HTTP status."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine
from websockets.http11 import Response

from cloudbot_common.models import InstanceState
from cloudbot_common.security.jwt_tokens import TokenCodec, TokenType
from cloudbot_common.settings import Settings
from tests.support.gateway import (
    MAX_SESSIONS_PER_USER,
    ORIGIN,
    Desktop,
    GatewayServer,
    Owner,
    add_instance,
    make_owner,
    refused,
    ticket_for,
    ws_connect,
)
from tests.support.leaks import SECRETS


def problem(response: Response) -> dict:
    assert response.headers["Content-Type"] == "application/problem+json"
    return json.loads(response.body)


@pytest.fixture
async def desktop_instance(db_engine: AsyncEngine, owner: Owner, desktop: Desktop) -> uuid.UUID:
    return await add_instance(db_engine, owner.id, vnc_port=desktop.vnc_port)


def vnc_url(gateway: GatewayServer, instance_id: uuid.UUID, query: str = "") -> str:
    return f"{gateway.ws_url}/api/instances/{instance_id}/vnc{query}"


async def test_no_credential(gateway: GatewayServer, desktop_instance: uuid.UUID) -> None:
    response = await refused(vnc_url(gateway, desktop_instance))
    assert response.status_code == 401
    assert problem(response)["code"] == "no_credential"


async def test_expired_access_token(
    gateway: GatewayServer, settings: Settings, owner: Owner, desktop_instance: uuid.UUID
) -> None:
    long_ago = datetime.now(UTC) - timedelta(hours=2)
    expired = (
        TokenCodec(settings).issue(TokenType.ACCESS, owner.id, owner.session_id, now=long_ago).token
    )
    SECRETS.add(expired)
    response = await refused(
        vnc_url(gateway, desktop_instance),
        additional_headers={"Authorization": f"Bearer {expired}"},
    )
    assert response.status_code == 401
    assert problem(response)["code"] == "invalid_credential"


async def test_refresh_token_used_as_access_token(
    gateway: GatewayServer, owner: Owner, desktop_instance: uuid.UUID
) -> None:
    response = await refused(
        vnc_url(gateway, desktop_instance),
        additional_headers={"Authorization": f"Bearer {owner.user.refresh_token}"},
    )
    assert response.status_code == 401


async def test_garbage_bearer(gateway: GatewayServer, desktop_instance: uuid.UUID) -> None:
    for value in ("Bearer", "Bearer not-a-jwt", "Basic dXNlcjpwYXNz"):
        response = await refused(
            vnc_url(gateway, desktop_instance), additional_headers={"Authorization": value}
        )
        assert response.status_code == 401


@pytest.mark.parametrize("param", ["access_token", "token", "ticket"])
async def test_access_token_in_the_url(
    gateway: GatewayServer, owner: Owner, desktop_instance: uuid.UUID, param: str
) -> None:
    response = await refused(
        vnc_url(gateway, desktop_instance, f"?{param}={owner.user.access_token}"), origin=ORIGIN
    )
    assert response.status_code == 401
    assert problem(response)["code"] == "token_in_url"


async def test_ticket_is_single_use(
    gateway: GatewayServer, owner: Owner, desktop_instance: uuid.UUID, http: httpx.AsyncClient
) -> None:
    ticket = await ticket_for(http, owner, desktop_instance, "vnc")
    url = vnc_url(gateway, desktop_instance, f"?ticket={ticket}")
    async with ws_connect(url, origin=ORIGIN) as ws:
        assert (await ws.recv())[:4] == b"RFB "
    response = await refused(url, origin=ORIGIN)
    assert response.status_code == 401
    assert problem(response)["code"] == "ticket_invalid"


async def test_ticket_for_another_instance_or_channel(
    gateway: GatewayServer,
    db_engine: AsyncEngine,
    owner: Owner,
    desktop: Desktop,
    desktop_instance: uuid.UUID,
    http: httpx.AsyncClient,
) -> None:
    other = await add_instance(db_engine, owner.id, vnc_port=desktop.vnc_port)
    ticket = await ticket_for(http, owner, other, "vnc")
    response = await refused(vnc_url(gateway, desktop_instance, f"?ticket={ticket}"), origin=ORIGIN)
    assert response.status_code == 401
    # Shown at the wrong door, the ticket is spent: it does not open the right one either.
    response = await refused(vnc_url(gateway, other, f"?ticket={ticket}"), origin=ORIGIN)
    assert response.status_code == 401

    ticket = await ticket_for(http, owner, desktop_instance, "cloudbot")
    response = await refused(vnc_url(gateway, desktop_instance, f"?ticket={ticket}"), origin=ORIGIN)
    assert response.status_code == 401
    assert problem(response)["code"] == "ticket_invalid"


async def test_another_users_instance_looks_missing(
    gateway: GatewayServer,
    settings: Settings,
    desktop_instance: uuid.UUID,
    http: httpx.AsyncClient,
) -> None:
    stranger = await make_owner(http, settings)
    theirs = await refused(vnc_url(gateway, desktop_instance), additional_headers=stranger.bearer)
    missing = await refused(vnc_url(gateway, uuid.uuid4()), additional_headers=stranger.bearer)
    assert theirs.status_code == missing.status_code == 404
    assert theirs.body == missing.body


async def test_instance_not_running(
    gateway: GatewayServer, db_engine: AsyncEngine, owner: Owner, desktop: Desktop
) -> None:
    stopped = await add_instance(
        db_engine, owner.id, state=InstanceState.STOPPED, vnc_port=desktop.vnc_port
    )
    response = await refused(vnc_url(gateway, stopped), additional_headers=owner.bearer)
    assert response.status_code == 409
    assert problem(response)["state"] == "stopped"


async def test_bad_origin_is_refused_before_the_ticket_is_spent(
    gateway: GatewayServer, owner: Owner, desktop_instance: uuid.UUID, http: httpx.AsyncClient
) -> None:
    ticket = await ticket_for(http, owner, desktop_instance, "vnc")
    url = vnc_url(gateway, desktop_instance, f"?ticket={ticket}")
    response = await refused(url, origin="http://evil.test")
    assert response.status_code == 403
    response = await refused(
        vnc_url(gateway, desktop_instance),
        origin="http://evil.test",
        additional_headers=owner.bearer,
    )
    assert response.status_code == 403
    async with ws_connect(url, origin=ORIGIN) as ws:
        assert (await ws.recv())[:4] == b"RFB "


async def test_too_many_sessions_per_user(
    gateway: GatewayServer, owner: Owner, desktop_instance: uuid.UUID
) -> None:
    url = vnc_url(gateway, desktop_instance)
    sessions = [
        await ws_connect(url, additional_headers=owner.bearer).__aenter__()
        for _ in range(MAX_SESSIONS_PER_USER)
    ]
    try:
        response = await refused(url, additional_headers=owner.bearer)
        assert response.status_code == 429
    finally:
        for ws in sessions:
            await ws.close()


async def test_unknown_paths_and_plain_http(gateway: GatewayServer) -> None:
    async with httpx.AsyncClient(base_url=gateway.http_url) as client:
        assert (await client.get("/nope")).status_code == 404
        r = await client.get(f"/api/instances/{uuid.uuid4()}/vnc")
        assert r.status_code == 426
