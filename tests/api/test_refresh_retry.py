"""A refresh retried after a lost answer (the same refresh token again, soon, from the
same client) gets the same new pair; from another client, or after the window, it is a
reuse and ends the login session. The kept pair is never in Redis in plain text."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import httpx
import pytest
from redis.asyncio import Redis

from tests.support.api import api_process
from tests.support.clients import api_client
from tests.support.leaks import SECRETS
from tests.support.users import make_user

WINDOW = 5


@pytest.fixture(scope="module")
def retry_api(base_env: dict[str, str]) -> Iterator[str]:
    env = {
        **base_env,
        "REFRESH_RETRY_SECONDS": str(WINDOW),
    }
    with api_process(env, "api-refresh-retry") as url:
        yield url


async def refresh(client: httpx.AsyncClient, token: str) -> httpx.Response:
    r = await client.post("/api/auth/refresh", json={"refresh_token": token})
    if r.status_code == 200:
        SECRETS.add(r.json()["access_token"], r.json()["refresh_token"])
    return r


async def me(client: httpx.AsyncClient, access: str) -> int:
    r = await client.get("/api/auth/me", headers={"Authorization": f"Bearer {access}"})
    return r.status_code


async def test_a_retry_from_the_same_client_gets_the_same_pair(retry_api, redis: Redis):
    async with api_client(retry_api) as client:
        user = await make_user(client)
        first = await refresh(client, user.refresh_token)
        assert first.status_code == 200, first.text
        again = await refresh(client, user.refresh_token)  # the first answer was "lost"
        assert again.status_code == 200, again.text
        assert again.json() == first.json()
        pair = first.json()
        assert await me(client, pair["access_token"]) == 200
        assert await me(client, user.access_token) == 200  # the session lives on

        # The kept pair is sealed: neither token is in Redis in the clear.
        values = [await redis.get(key) async for key in redis.scan_iter("cloudbot:refresh-retry:*")]
        assert values
        for value in values:
            for secret in (pair["access_token"], pair["refresh_token"], user.refresh_token):
                assert secret not in value
                assert secret.split(".")[1] not in value  # not even the claims

        # The chain goes on from the new token.
        nxt = await refresh(client, pair["refresh_token"])
        assert nxt.status_code == 200, nxt.text


async def test_concurrent_refreshes_from_one_client_rotate_once(retry_api):
    async with api_client(retry_api) as client:
        user = await make_user(client)
        answers = await asyncio.gather(*[refresh(client, user.refresh_token) for _ in range(3)])
        assert [r.status_code for r in answers] == [200, 200, 200]
        assert len({r.json()["refresh_token"] for r in answers}) == 1


async def test_the_same_token_from_another_client_is_a_reuse(retry_api):
    async with api_client(retry_api) as owner:
        user = await make_user(owner)
        first = await refresh(owner, user.refresh_token)
        assert first.status_code == 200
        async with api_client(retry_api) as thief:  # another address, within the window
            r = await refresh(thief, user.refresh_token)
        assert r.status_code == 401
        assert r.json()["code"] == "refresh_token_reused"
        assert await me(owner, first.json()["access_token"]) == 401
        assert (await refresh(owner, first.json()["refresh_token"])).status_code == 401


async def test_after_the_window_it_is_a_reuse(retry_api):
    async with api_client(retry_api) as client:
        user = await make_user(client)
        first = await refresh(client, user.refresh_token)
        assert first.status_code == 200
        await asyncio.sleep(WINDOW + 1)
        r = await refresh(client, user.refresh_token)
        assert r.status_code == 401
        assert r.json()["code"] == "refresh_token_reused"
        assert await me(client, first.json()["access_token"]) == 401
