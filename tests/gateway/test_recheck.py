"""The fallback for missed events: the periodic re-check ends sessions whose instance
left `running` or whose login ended, reading Postgres and Redis rather than the cache
the missed events would have updated."""

from __future__ import annotations

import uuid

from redis.asyncio import Redis
from sqlalchemy import update
from sqlalchemy.ext.asyncio import AsyncEngine

from cloudbot_common.events import EventHub, revoked_session_key
from cloudbot_common.models import Instance, InstanceState
from cloudbot_common.revocations import RevocationWatch
from cloudbot_common.tickets import Channel
from cloudbot_gateway.metrics import Metrics
from cloudbot_gateway.sessions import SessionRegistry
from cloudbot_gateway.targets import TargetDirectory
from tests.support.gateway import Owner, add_instance


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
