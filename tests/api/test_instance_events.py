"""Server-Sent Events of an instance's state changes, streamed by the API process while
the provisioner's part is played by hand in transactions of their own."""

from __future__ import annotations

import asyncio
import json

import httpx

from cloudbot_api.instances.router import SSE_KEEPALIVE_SECONDS
from cloudbot_common.models import InstanceState
from tests.support.instances import create, move, read_sse_lines


async def read_sse(response: httpx.Response, count: int) -> list[dict[str, str]]:
    return await read_sse_lines(response.aiter_lines(), count)


async def test_events_stream_and_resume(http, user, db_engine, redis):
    iid = (await create(http, user)).json()["id"]
    url = f"/api/instances/{iid}/events"

    async def collect(count: int, **headers) -> list[dict]:
        async with http.stream("GET", url, headers={**user.headers, **headers}) as r:
            assert r.status_code == 200
            assert r.headers["content-type"].startswith("text/event-stream")
            return await asyncio.wait_for(read_sse(r, count), 20)

    # Live: the stream starts with history, then follows changes as they are published.
    # The later events must come from the event hub's wake-up, within a deadline shorter
    # than the stream's fallback re-read, so a broken push cannot pass unnoticed.
    async with http.stream("GET", url, headers=user.headers) as r:
        lines = r.aiter_lines()
        first = await asyncio.wait_for(read_sse_lines(lines, 1), 10)
        await move(db_engine, redis, iid, InstanceState.PROVISIONING, InstanceState.RUNNING)
        rest = await asyncio.wait_for(read_sse_lines(lines, 2), SSE_KEEPALIVE_SECONDS / 3)
    events = first + rest
    assert [json.loads(e["data"])["state"] for e in events] == [
        "pending",
        "provisioning",
        "running",
    ]
    assert all(e["event"] == "state" for e in events)
    ids = [int(e["id"]) for e in events]
    assert ids == sorted(ids)

    # Resume after the second: only what came later.
    resumed = await collect(1, **{"Last-Event-ID": str(ids[1])})
    assert [json.loads(e["data"])["state"] for e in resumed] == ["running"]

    # The stream ends after terminated.
    await move(db_engine, redis, iid, InstanceState.TERMINATING, InstanceState.TERMINATED)
    async with http.stream("GET", url, headers={**user.headers, "Last-Event-ID": str(ids[2])}) as r:
        tail = await asyncio.wait_for(read_sse(r, 10), 20)
    assert [json.loads(e["data"])["state"] for e in tail] == ["terminating", "terminated"]
