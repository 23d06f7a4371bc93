"""Server-Sent Events streams are bounded: a per-user cap across API replicas, an end when
the login session ends, and a maximum lifetime. Against an API with small bounds."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Iterator

import httpx
import pytest

from tests.support.api import api_process
from tests.support.clients import api_client
from tests.support.instances import create, read_sse_lines
from tests.support.users import User, make_user

MAX_STREAMS = 2
LIFETIME = 10


@pytest.fixture(scope="module")
def bounded_api(base_env: dict[str, str]) -> Iterator[str]:
    env = {
        **base_env,
        "SSE_MAX_STREAMS_PER_USER": str(MAX_STREAMS),
        "SSE_MAX_STREAM_SECONDS": str(LIFETIME),
    }
    with api_process(env, "api-streams") as url:
        yield url


@pytest.fixture
async def http(bounded_api: str) -> AsyncIterator[httpx.AsyncClient]:
    async with api_client(bounded_api, timeout=30) as client:
        yield client


@contextlib.asynccontextmanager
async def opened(
    http: httpx.AsyncClient, user: User, path: str
) -> AsyncIterator[AsyncIterator[str]]:
    """An open stream's lines, once its first event arrived (kept in one iterator: an
    abandoned one would close the response)."""
    async with http.stream("GET", path, headers=user.headers) as r:
        assert r.status_code == 200
        lines = r.aiter_lines()
        await asyncio.wait_for(read_sse_lines(lines, 1), 10)
        yield lines


async def until_closed(lines: AsyncIterator[str], within: float) -> float:
    """Seconds until the server ends the stream; fails if it does not within `within`."""
    started = time.monotonic()
    async with asyncio.timeout(within):
        async for _ in lines:
            pass
    return time.monotonic() - started


async def test_streams_count_against_a_per_user_cap(http: httpx.AsyncClient) -> None:
    user, other = await make_user(http), await make_user(http)
    iid = (await create(http, user)).json()["id"]
    paths = [f"/api/instances/{iid}/events", "/api/instances/events"]
    async with contextlib.AsyncExitStack() as stack:
        for path in paths[:MAX_STREAMS]:
            await stack.enter_async_context(opened(http, user, path))
        for path in paths:
            r = await http.get(path, headers=user.headers)
            assert r.status_code == 429, r.text
            assert r.json()["code"] == "too_many_streams"
        # Another user is not counted with this one.
        async with opened(http, other, "/api/instances/events"):
            pass
    # Closed streams give their place back.
    async with opened(http, user, paths[0]):
        pass


async def test_an_instance_stream_ends_on_logout(http: httpx.AsyncClient) -> None:
    user = await make_user(http)
    iid = (await create(http, user)).json()["id"]
    async with opened(http, user, f"/api/instances/{iid}/events") as lines:
        assert (await http.post("/api/auth/logout", headers=user.headers)).status_code == 204
        assert await until_closed(lines, within=LIFETIME - 1) < LIFETIME - 1


@pytest.mark.parametrize("path", ["/api/instances/{iid}/events", "/api/instances/events"])
async def test_streams_end_after_their_lifetime(http: httpx.AsyncClient, path: str) -> None:
    user = await make_user(http)
    iid = (await create(http, user)).json()["id"]
    async with opened(http, user, path.format(iid=iid)) as lines:
        lasted = await until_closed(lines, within=LIFETIME + 10)
    assert lasted <= LIFETIME + 1
