"""GET /api/instances/events: one stream of all of a user's machines, what the console
lists and keeps live. A snapshot first, then each change (state and health) pushed by the
event hub, then removal; the stream ends with the login session."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator

import pytest

from cloudbot_api.instances.router import SSE_KEEPALIVE_SECONDS
from cloudbot_common.db import create_session_factory, unit_of_work
from cloudbot_common.events import InstanceStateEvent, publish_instance_event
from cloudbot_common.models import Instance, InstanceEvent, InstanceState
from tests.support.instances import (
    create,
    give_bootstrap_token,
    machine_proof,
    move,
    read_sse_lines,
)
from tests.support.leaks import SECRETS
from tests.support.users import make_user

# Pushed changes must arrive well before the stream's fallback re-read would find them.
PUSHED = SSE_KEEPALIVE_SECONDS / 3


async def next_event(lines: AsyncIterator[str]) -> tuple[str, dict]:
    [event] = await asyncio.wait_for(read_sse_lines(lines, 1), PUSHED)
    return event["event"], json.loads(event["data"])


async def test_the_feed_lists_then_follows_every_machine_of_the_user(http, user, db_engine, redis):
    kept = (await create(http, user, name="kept")).json()["id"]
    other = await make_user(http)
    async with http.stream("GET", "/api/instances/events", headers=user.headers) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = r.aiter_lines()
        kind, snapshot = await next_event(lines)
        assert kind == "snapshot"
        assert [i["id"] for i in snapshot["items"]] == [kept]

        # A new machine, and its way to running.
        new = (await create(http, user, name="new")).json()["id"]
        kind, data = await next_event(lines)
        assert (kind, data["id"], data["state"]) == ("instance", new, "pending")
        await move(db_engine, redis, new, InstanceState.PROVISIONING)
        kind, data = await next_event(lines)
        assert (kind, data["id"], data["state"]) == ("instance", new, "provisioning")

        # Health as the machine reports it; the same report again is no news.
        token = await give_bootstrap_token(db_engine, new)
        boot = await http.post(
            "/api/agent/bootstrap",
            json=await machine_proof(db_engine, new),
            headers={"Authorization": f"Bearer {token}"},
        )
        SECRETS.add(boot.json()["credential"], boot.json()["agent_token"])
        beat = {"Authorization": f"Bearer {boot.json()['credential']}"}
        for _ in range(2):
            r2 = await http.post(
                "/api/agent/heartbeat", json={"desktop": True, "agent": True}, headers=beat
            )
            assert r2.status_code == 204
        kind, data = await next_event(lines)
        assert kind == "instance"
        assert data["health"]["desktop"] is True
        assert data["health"]["agent"] is True
        await http.post(
            "/api/agent/heartbeat", json={"desktop": False, "agent": True}, headers=beat
        )
        kind, data = await next_event(lines)
        assert (kind, data["health"]["desktop"]) == ("instance", False)

        # Someone else's machine never shows here.
        await create(http, other, name="theirs")
        # Terminated: removed from the list.
        # (The stream says what is now, so each step is awaited before the next: two
        # changes close together may come as one.)
        await move(db_engine, redis, new, InstanceState.TERMINATING)
        kind, data = await next_event(lines)
        assert (kind, data["state"]) == ("instance", "terminating")
        await move(db_engine, redis, new, InstanceState.TERMINATED)
        kind, data = await next_event(lines)
        assert (kind, data) == ("removed", {"id": new})


async def test_the_feed_ends_when_the_login_session_does(http, user):
    async with http.stream("GET", "/api/instances/events", headers=user.headers) as r:
        lines = r.aiter_lines()
        kind, _ = await next_event(lines)
        assert kind == "snapshot"
        assert (await http.post("/api/auth/logout", headers=user.headers)).status_code == 204
        rest = [line async for line in _until_closed(lines)]
    assert not [line for line in rest if line.startswith("event:")]


async def _until_closed(lines: AsyncIterator[str]) -> AsyncIterator[str]:
    async with asyncio.timeout(PUSHED):
        async for line in lines:
            yield line


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer nope"}])
async def test_the_feed_needs_a_user(http, headers):
    r = await http.get("/api/instances/events", headers=headers)
    assert r.status_code == 401


async def test_the_feed_passes_on_idle_warnings_of_the_users_machines(http, user, db_engine, redis):
    mine = (await create(http, user, name="mine")).json()["id"]
    async with http.stream("GET", "/api/instances/events", headers=user.headers) as r:
        lines = r.aiter_lines()
        kind, _ = await next_event(lines)
        assert kind == "snapshot"
        # What the provisioner's idle sweep writes and announces.
        reason = "Idle; stops at 2026-12-01T01:00:00+00:00 unless used."
        async with unit_of_work(create_session_factory(db_engine)) as session:
            row = await session.get(Instance, uuid.UUID(mine))
            assert row is not None
            entry = InstanceEvent(
                instance_id=row.id, state=row.state, reason=reason, kind="idle_warning"
            )
            session.add(entry)
            await session.flush()
            event = InstanceStateEvent(
                event_id=entry.id,
                instance_id=mine,
                owner_id=str(row.owner_id),
                state=row.state,
                reason=reason,
            )
        await publish_instance_event(redis, event)
        kind, data = await next_event(lines)
    assert kind == "idle_warning"
    assert data["id"] == mine
    assert data["reason"] == reason
