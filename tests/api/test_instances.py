"""The instance API on its own (no worker running): states, guards, quota, idempotency,
ownership, the outbox, SSE and the instance-facing endpoints."""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from redis.asyncio import Redis
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from cloudbot_api.instances.router import SSE_KEEPALIVE_SECONDS
from cloudbot_common.db import create_session_factory, unit_of_work
from cloudbot_common.events import publish_instance_event
from cloudbot_common.lifecycle import PROVISION, START, STOP, TERMINATE, lock_instance, transition
from cloudbot_common.models import Instance, InstanceState, OutboxCommand
from cloudbot_common.security.opaque import new_token, token_digest
from tests.api.test_auth import assert_problem
from tests.conftest import SECRETS, make_user
from tests.support.processes import PYTHON, free_port, http_ok, running


async def create(http, user, name="desk", size="small", **headers) -> httpx.Response:
    return await http.post(
        "/api/instances", json={"name": name, "size": size}, headers={**user.headers, **headers}
    )


async def move(engine: AsyncEngine, redis_url: str, instance_id: str, *states: InstanceState):
    """Play the provisioner's part: move the row through `states` and publish each event."""
    redis = Redis.from_url(redis_url)
    sessions = create_session_factory(engine)
    for state in states:
        async with unit_of_work(sessions) as session:
            row = await lock_instance(session, uuid.UUID(instance_id))
            assert row is not None
            event = await transition(session, row, state)
        await publish_instance_event(redis, event)
    await redis.aclose()


async def test_create_answers_202_pending_and_writes_the_outbox(http, user, engine):
    r = await create(http, user, name="My desk 1")
    assert r.status_code == 202, r.text
    body = r.json()
    assert body["state"] == "pending"
    assert body["name"] == "My desk 1"
    assert body["health"] == {"desktop": None, "agent": None, "last_heartbeat_at": None}
    assert r.headers["location"] == f"/api/instances/{body['id']}"
    assert (await http.get(r.headers["location"], headers=user.headers)).json()["id"] == body["id"]
    listing = (await http.get("/api/instances", headers=user.headers)).json()["items"]
    assert [i["id"] for i in listing] == [body["id"]]

    async with engine.connect() as conn:
        rows = (
            await conn.execute(
                select(OutboxCommand).where(OutboxCommand.instance_id == uuid.UUID(body["id"]))
            )
        ).all()
        instance = (
            await conn.execute(select(Instance).where(Instance.id == uuid.UUID(body["id"])))
        ).one()
    assert [row.task for row in rows] == [PROVISION.task]
    assert rows[0].request_id == r.headers["x-request-id"]
    assert instance.instance_type == "t3.small"


@pytest.mark.parametrize(
    ("payload", "status", "code"),
    [
        ({"name": "desk", "size": "t3.2xlarge"}, 422, "unknown_size"),
        ({"name": "desk", "size": "huge"}, 422, "unknown_size"),
        ({"name": "", "size": "small"}, 422, "validation_failed"),
        ({"name": "x" * 65, "size": "small"}, 422, "validation_failed"),
        ({"name": "<script>", "size": "small"}, 422, "validation_failed"),
        (
            {"name": "desk", "size": "small", "instance_type": "p5.48xlarge"},
            422,
            "validation_failed",
        ),
    ],
)
async def test_create_validates_name_and_size(http, user, engine, payload, status, code):
    r = await http.post("/api/instances", json=payload, headers=user.headers)
    assert_problem(r, status, code)
    assert (await http.get("/api/instances", headers=user.headers)).json()["items"] == []


async def test_idempotency_key_returns_the_first_answer(http, user, engine):
    key = str(uuid.uuid4())
    first = await create(http, user, **{"Idempotency-Key": key})
    again = await create(http, user, **{"Idempotency-Key": key})
    assert first.status_code == again.status_code == 202
    assert first.json() == again.json()
    concurrent = await asyncio.gather(
        *[create(http, user, name="other", **{"Idempotency-Key": "k2"}) for _ in range(3)]
    )
    assert len({r.json()["id"] for r in concurrent}) == 1
    items = (await http.get("/api/instances", headers=user.headers)).json()["items"]
    assert len(items) == 2
    reused = await create(http, user, name="different", **{"Idempotency-Key": key})
    assert_problem(reused, 422, "idempotency_key_reused")
    async with engine.connect() as conn:
        count = await conn.scalar(
            select(func.count())
            .select_from(Instance)
            .where(Instance.id.in_([uuid.UUID(i["id"]) for i in items]))
        )
    assert count == 2


async def test_concurrent_creates_of_one_user_keep_the_quota_without_deadlock(http, user):
    """Creates of one user at once, each with its own Idempotency-Key: the quota admits
    exactly three; none fails (two of them used to deadlock on the user's row)."""
    answers = await asyncio.gather(
        *[create(http, user, name=f"c{i}", **{"Idempotency-Key": f"c{i}"}) for i in range(8)]
    )
    assert sorted(r.status_code for r in answers) == [202] * 3 + [403] * 5, [
        r.text for r in answers
    ]


async def test_live_instance_quota(http, user):
    for i in range(3):
        assert (await create(http, user, name=f"d{i}")).status_code == 202
    r = await create(http, user, name="d3")
    assert_problem(r, 403, "instance_quota_exceeded")
    # A machine being deleted no longer counts against the quota.
    first = (await http.get("/api/instances", headers=user.headers)).json()["items"][0]
    assert (
        await http.delete(f"/api/instances/{first['id']}", headers=user.headers)
    ).status_code == 202
    assert (await create(http, user, name="d4")).status_code == 202


async def test_state_guards_answer_409_with_the_state(http, user, engine, redis_url):
    iid = (await create(http, user)).json()["id"]
    for action in ("stop", "start"):
        r = await http.post(f"/api/instances/{iid}/{action}", headers=user.headers)
        body = assert_problem(r, 409, "instance_state_conflict")
        assert body["state"] == "pending"

    await move(engine, redis_url, iid, InstanceState.PROVISIONING, InstanceState.RUNNING)
    assert_problem(
        await http.post(f"/api/instances/{iid}/start", headers=user.headers),
        409,
        "instance_state_conflict",
    )
    r = await http.post(f"/api/instances/{iid}/stop", headers=user.headers)
    assert r.status_code == 202
    assert r.json()["state"] == "stopping"
    assert_problem(
        await http.post(f"/api/instances/{iid}/stop", headers=user.headers),
        409,
        "instance_state_conflict",
    )
    await move(engine, redis_url, iid, InstanceState.STOPPED)
    r = await http.post(f"/api/instances/{iid}/start", headers=user.headers)
    assert r.json()["state"] == "starting"
    r = await http.delete(f"/api/instances/{iid}", headers=user.headers)
    assert r.status_code == 202
    assert r.json()["state"] == "terminating"
    body = assert_problem(
        await http.delete(f"/api/instances/{iid}", headers=user.headers),
        409,
        "instance_state_conflict",
    )
    assert body["state"] == "terminating"
    async with engine.connect() as conn:
        tasks = (
            await conn.scalars(
                select(OutboxCommand.task)
                .where(OutboxCommand.instance_id == uuid.UUID(iid))
                .order_by(OutboxCommand.created_at)
            )
        ).all()
    assert tasks == [c.task for c in (PROVISION, STOP, START, TERMINATE)]


async def test_another_users_instance_is_not_found_everywhere(http, user, engine, redis_url):
    iid = (await create(http, user)).json()["id"]
    await move(engine, redis_url, iid, InstanceState.PROVISIONING, InstanceState.RUNNING)
    other = await make_user(http)
    h = other.headers
    missing = str(uuid.uuid4())
    for target in (iid, missing):
        for method, path, body in [
            ("GET", "", None),
            ("DELETE", "", None),
            ("POST", "/stop", None),
            ("POST", "/start", None),
            ("POST", "/tickets", {"channel": "vnc"}),
            ("GET", "/events", None),
        ]:
            r = await http.request(method, f"/api/instances/{target}{path}", headers=h, json=body)
            problem = assert_problem(r, 404, "instance_not_found")
            assert problem["detail"] == "No such instance."
    assert (await http.get("/api/instances", headers=h)).json()["items"] == []
    # The owner's instance is untouched.
    assert (await http.get(f"/api/instances/{iid}", headers=user.headers)).json()[
        "state"
    ] == "running"


async def test_tickets_only_for_running_instances(http, user, engine, redis_url, redis):
    iid = (await create(http, user)).json()["id"]
    r = await http.post(
        f"/api/instances/{iid}/tickets", json={"channel": "vnc"}, headers=user.headers
    )
    assert_problem(r, 409, "instance_state_conflict")
    await move(engine, redis_url, iid, InstanceState.PROVISIONING, InstanceState.RUNNING)
    r = await http.post(
        f"/api/instances/{iid}/tickets", json={"channel": "cloudbot"}, headers=user.headers
    )
    assert r.status_code == 201
    ticket = r.json()
    SECRETS.add(ticket["ticket"])
    assert ticket["url"].endswith(f"/api/instances/{iid}/cloudbot?ticket={ticket['ticket']}")
    assert 0 < await redis.ttl(f"cloudbot:ticket:{token_digest(ticket['ticket'])}") <= 30
    r = await http.post(
        f"/api/instances/{iid}/tickets", json={"channel": "ssh"}, headers=user.headers
    )
    assert_problem(r, 422, "validation_failed")


async def read_sse(response: httpx.Response, count: int) -> list[dict]:
    return await read_sse_lines(response.aiter_lines(), count)


async def read_sse_lines(lines: AsyncIterator[str], count: int) -> list[dict]:
    events: list[dict] = []
    current: dict[str, str] = {}
    async for line in lines:
        if line == "":
            if "data" in current:
                events.append(current)
                if len(events) == count:
                    return events
            current = {}
        elif not line.startswith(":"):
            field, _, value = line.partition(":")
            current[field] = value.strip()
    return events


async def test_events_stream_and_resume(http, user, engine, redis_url):
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
        await move(engine, redis_url, iid, InstanceState.PROVISIONING, InstanceState.RUNNING)
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
    await move(engine, redis_url, iid, InstanceState.TERMINATING, InstanceState.TERMINATED)
    async with http.stream("GET", url, headers={**user.headers, "Last-Event-ID": str(ids[2])}) as r:
        tail = await asyncio.wait_for(read_sse(r, 10), 20)
    assert [json.loads(e["data"])["state"] for e in tail] == ["terminating", "terminated"]


async def give_bootstrap_token(engine: AsyncEngine, instance_id: str, ttl: int = 600) -> str:
    """What the provisioner does at launch: mint a token and keep only its digest."""
    token = new_token("cbb_")
    SECRETS.add(token)
    async with unit_of_work(create_session_factory(engine)) as session:
        row = await session.get(Instance, uuid.UUID(instance_id))
        assert row is not None
        row.bootstrap_token_hash = token_digest(token)
        row.bootstrap_expires_at = datetime.now(UTC) + timedelta(seconds=ttl)
    return token


async def test_bootstrap_token_works_once_and_heartbeats_show_health(http, user, engine, redis_url):
    key = "sk-ant-" + uuid.uuid4().hex * 2
    SECRETS.add(key)
    await http.post(
        "/api/user/api-keys", json={"provider": "anthropic", "key": key}, headers=user.headers
    )
    iid = (await create(http, user)).json()["id"]
    await move(engine, redis_url, iid, InstanceState.PROVISIONING)
    token = await give_bootstrap_token(engine, iid)

    r = await http.post("/api/agent/bootstrap", headers={"Authorization": f"Bearer {token}"})
    assert r.status_code == 200, r.text
    boot = r.json()
    SECRETS.add(boot["credential"], boot["agent_token"])
    assert boot["instance_id"] == iid
    assert boot["config"]["providers"]["anthropic"] == {"api_key": key, "env": "ANTHROPIC_API_KEY"}
    assert boot["config"]["agent"]["auth_token"] == boot["agent_token"]
    assert boot["credential"].startswith("cbc_")

    again = await http.post("/api/agent/bootstrap", headers={"Authorization": f"Bearer {token}"})
    assert_problem(again, 401, "invalid_bootstrap_token")

    hb = {"Authorization": f"Bearer {boot['credential']}"}
    r = await http.post("/api/agent/heartbeat", json={"desktop": True, "agent": False}, headers=hb)
    assert r.status_code == 204
    health = (await http.get(f"/api/instances/{iid}", headers=user.headers)).json()["health"]
    assert health["desktop"] is True
    assert health["agent"] is False
    assert health["last_heartbeat_at"] is not None

    # A machine that stopped reporting has unknown health, not its last "up".
    async with unit_of_work(create_session_factory(engine)) as session:
        row = await session.get(Instance, uuid.UUID(iid))
        assert row is not None
        row.last_heartbeat_at = datetime.now(UTC) - timedelta(seconds=121)
    health = (await http.get(f"/api/instances/{iid}", headers=user.headers)).json()["health"]
    assert health["desktop"] is None
    assert health["agent"] is None
    assert health["last_heartbeat_at"] is not None
    # A user's access token is not an instance credential.
    r = await http.post(
        "/api/agent/heartbeat", json={"desktop": True, "agent": True}, headers=user.headers
    )
    assert_problem(r, 401, "invalid_instance_credential")


async def test_expired_bootstrap_token_is_refused(http, user, engine):
    iid = (await create(http, user)).json()["id"]
    token = await give_bootstrap_token(engine, iid, ttl=-1)
    r = await http.post("/api/agent/bootstrap", headers={"Authorization": f"Bearer {token}"})
    assert_problem(r, 401, "invalid_bootstrap_token")


@contextlib.asynccontextmanager
async def api_with(base_env: dict[str, str], **overrides: str) -> AsyncIterator[httpx.AsyncClient]:
    """A second API process with some settings changed, and a client for it."""
    port = free_port()
    env = {**base_env, **overrides, "API_PORT": str(port)}
    with running(
        "api-variant",
        [PYTHON, "-m", "cloudbot_api"],
        env,
        ready=http_ok(f"http://127.0.0.1:{port}/healthz"),
    ):
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            yield client


async def test_broker_down_at_create_still_accepts_and_keeps_the_command(
    base_env, http, user, engine
):
    """The queue is unreachable: the create is stored with its command, which stays
    unpublished for the relay to send once the broker is back."""
    port = free_port()
    dead_broker = f"redis://127.0.0.1:{free_port()}/0"
    env = {**base_env, "API_PORT": str(port), "CELERY_BROKER_URL": dead_broker}
    with running(
        "api-dead-broker",
        [PYTHON, "-m", "cloudbot_api"],
        env,
        ready=http_ok(f"http://127.0.0.1:{port}/healthz"),
    ):
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            r = await create(client, user)
    assert r.status_code == 202, r.text
    async with engine.connect() as conn:
        row = (
            await conn.execute(
                select(OutboxCommand).where(OutboxCommand.instance_id == uuid.UUID(r.json()["id"]))
            )
        ).one()
    assert row.published_at is None
    assert row.completed_at is None


async def test_redis_down_at_create_fails_cleanly(base_env, user, engine):
    """Redis (sessions, rate limits) unreachable: a clear 503 and nothing written."""
    port = free_port()
    dead = f"redis://127.0.0.1:{free_port()}/0"
    env = {**base_env, "API_PORT": str(port), "REDIS_URL": dead}
    async with engine.connect() as conn:
        before = await conn.scalar(select(func.count()).select_from(Instance))
    with running(
        "api-dead-redis",
        [PYTHON, "-m", "cloudbot_api"],
        env,
        ready=http_ok(f"http://127.0.0.1:{port}/healthz"),
    ):
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            r = await create(client, user)
            ready = await client.get("/readyz")
    assert_problem(r, 503, "dependency_unavailable")
    assert r.headers["retry-after"]
    assert ready.status_code == 503
    async with engine.connect() as conn:
        assert await conn.scalar(select(func.count()).select_from(Instance)) == before
