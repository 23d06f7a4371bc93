"""The fallback for missed events: the periodic re-check ends sessions whose instance
left `running` or whose login ended, reading Postgres and Redis rather than the cache
the missed events would have updated, and Postgres alone for logins while Redis is away."""

from __future__ import annotations

import uuid

import httpx
from redis.asyncio import Redis
from sqlalchemy import func, insert, update
from sqlalchemy.ext.asyncio import AsyncEngine

from cloudbot_common.events import EventHub, revoked_session_key
from cloudbot_common.models import Instance, InstanceState, LoginSession, PersonalAccessToken
from cloudbot_common.revocations import RevocationWatch
from cloudbot_common.settings import Settings
from cloudbot_common.tickets import Channel
from cloudbot_gateway.metrics import Metrics
from cloudbot_gateway.sessions import SessionRegistry
from cloudbot_gateway.targets import TargetDirectory
from tests.support.gateway import Owner, add_instance, make_owner
from tests.support.processes import free_port


async def test_recheck_ends_sessions_changed_behind_its_back(
    db_engine: AsyncEngine, redis: Redis, owner: Owner
) -> None:
    targets = TargetDirectory(db_engine, redis)
    # The event hub is never started: every event is "missed".
    hub = EventHub(redis)
    registry = SessionRegistry(
        redis,
        hub,
        Metrics(),
        targets.states,
        max_per_user=10,
        idle_timeout=300,
        revocations=RevocationWatch(db_engine, redis, hub, remember_seconds=60),
    )
    running = await add_instance(db_engine, owner.id)
    stopped = await add_instance(db_engine, owner.id)
    deleted_row = uuid.uuid4()
    sessions = {}
    for name, instance_id, login in (
        ("running", running, owner.session_id),
        ("stopped", stopped, owner.session_id),
        ("gone", deleted_row, owner.session_id),
        ("logged_out", running, uuid.uuid4()),
    ):
        session = registry.new_session(owner.id, login, instance_id, Channel.VNC, "bearer")
        await registry.acquire(session)
        registry.attach(session)
        sessions[name] = session

    # Changed without any event reaching this gateway.
    async with db_engine.begin() as conn:
        await conn.execute(
            update(Instance).where(Instance.id == stopped).values(state=InstanceState.STOPPED)
        )
    await redis.set(revoked_session_key(sessions["logged_out"].login_session_id), "1", ex=60)

    await registry._renew_and_recheck()

    assert not sessions["running"].stop.done()
    assert sessions["stopped"].stop.result().reason == "instance stopped"
    assert sessions["gone"].stop.result().reason == "instance terminated"
    assert sessions["logged_out"].stop.result().cause == "logout"
    for session in sessions.values():
        registry.detach(session, "test")
    await registry.aclose()


async def test_recheck_asks_postgres_while_redis_is_away(
    db_engine: AsyncEngine, redis: Redis, owner: Owner, http: httpx.AsyncClient, settings: Settings
) -> None:
    ended = await make_owner(http, settings)
    # Revoked in Postgres, announced, but the marker is gone (Redis lost it), and the
    # revocation checks cannot reach Redis at all.
    async with db_engine.begin() as conn:
        await conn.execute(
            update(LoginSession)
            .where(LoginSession.id == ended.session_id)
            .values(revoked_at=func.now(), revocation_announced_at=func.now())
        )
    away = Redis.from_url(f"redis://127.0.0.1:{free_port()}/0", socket_connect_timeout=1)
    hub = EventHub(redis)
    watch = RevocationWatch(db_engine, away, hub, remember_seconds=60)
    assert await watch.is_revoked(ended.session_id)
    assert not await watch.is_revoked(owner.session_id)
    registry = SessionRegistry(
        redis,
        hub,
        Metrics(),
        TargetDirectory(db_engine, redis).states,
        max_per_user=10,
        idle_timeout=300,
        revocations=watch,
    )
    instance_id = await add_instance(db_engine, owner.id)
    sessions = []
    for who in (owner, ended):
        session = registry.new_session(who.id, who.session_id, instance_id, Channel.VNC, "bearer")
        await registry.acquire(session)
        registry.attach(session)
        sessions.append(session)

    await registry._renew_and_recheck()

    assert not sessions[0].stop.done()
    assert sessions[1].stop.result().cause == "logout"
    for session in sessions:
        registry.detach(session, "test")
    await registry.aclose()
    await away.aclose()


async def test_recheck_ends_sessions_whose_revocation_never_reached_redis(
    db_engine: AsyncEngine, redis: Redis, owner: Owner, http: httpx.AsyncClient, settings: Settings
) -> None:
    """Revoked in Postgres, but no marker and no event (the write failed, or Redis lost it
    since): a login, and a personal access token a session was opened with."""
    ended = await make_owner(http, settings)
    token_id = uuid.uuid4()
    async with db_engine.begin() as conn:
        await conn.execute(
            update(LoginSession)
            .where(LoginSession.id == ended.session_id)
            .values(revoked_at=func.now(), revocation_announced_at=func.now())
        )
        await conn.execute(
            insert(PersonalAccessToken).values(
                id=token_id,
                user_id=owner.id,
                name="ci",
                scope="write",
                token_digest=uuid.uuid4().hex,
                hint="cbp_x",
                revoked_at=func.now(),
            )
        )
    hub = EventHub(redis)
    registry = SessionRegistry(
        redis,
        hub,
        Metrics(),
        TargetDirectory(db_engine, redis).states,
        max_per_user=10,
        idle_timeout=300,
        revocations=RevocationWatch(db_engine, redis, hub, remember_seconds=60),
    )
    instance_id = await add_instance(db_engine, owner.id)
    sessions = []
    for user_id, login in (
        (owner.id, owner.session_id),
        (ended.id, ended.session_id),
        (owner.id, token_id),
    ):
        session = registry.new_session(user_id, login, instance_id, Channel.VNC, "bearer")
        await registry.acquire(session)
        registry.attach(session)
        sessions.append(session)

    await registry._renew_and_recheck()

    assert not sessions[0].stop.done()
    assert sessions[1].stop.result().cause == "logout"
    assert sessions[2].stop.result().cause == "logout"
    for session in sessions:
        registry.detach(session, "test")
    await registry.aclose()
