"""The shared target cache: replicas write the same state events, each in its own order
and a little late, and database reads race state changes; the newest state must win."""

from __future__ import annotations

import json

import pytest
from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import AsyncEngine

from cloudbot_common.models import InstanceState as S
from cloudbot_gateway.refusals import Refusal
from cloudbot_gateway.targets import TargetDirectory
from tests.support.gateway import Owner, add_instance
from tests.support.instances import move


async def _state_refused(targets: TargetDirectory, instance_id: object, owner: Owner) -> str:
    with pytest.raises(Refusal) as refused:
        await targets.resolve(instance_id, owner.id)  # type: ignore[arg-type]
    return str(refused.value.state)


async def test_a_late_event_never_replaces_a_newer_state(
    db_engine: AsyncEngine, redis: Redis, owner: Owner
) -> None:
    targets = TargetDirectory(db_engine, redis)
    instance_id = await add_instance(db_engine, owner.id, vnc_port=5900, gated=False)
    key = f"cloudbot:gateway:target:{instance_id}"
    try:
        # Cached from the database while running, with the address.
        assert (await targets.resolve(instance_id, owner.id)).vnc_port == 5900
        assert json.loads(await redis.get(key))["s"] == "running"

        stopping, stopped = await move(db_engine, None, instance_id, S.STOPPING, S.STOPPED)
        # This replica hears the two events the wrong way round.
        targets.on_state_event(stopped)
        targets.on_state_event(stopping)
        await targets.aclose()  # both writes done
        assert await _state_refused(targets, instance_id, owner) == "stopped"

        # Started again; the late "starting" must not hide "running" either, and the
        # database read that fills in the address keeps the newest event's id.
        starting, running = await move(db_engine, None, instance_id, S.STARTING, S.RUNNING)
        targets.on_state_event(running)
        targets.on_state_event(starting)
        await targets.aclose()
        assert (await targets.resolve(instance_id, owner.id)).vnc_port == 5900
        entry = json.loads(await redis.get(key))
        assert (entry["s"], entry["e"], entry["h"]) == ("running", running.event_id, "127.0.0.1")

        # A database read that saw an older state than an event already written (it raced
        # the change) does not put it back.
        (stopping_again,) = await move(db_engine, None, instance_id, S.STOPPING)
        targets.on_state_event(stopping_again)
        await targets.aclose()
        await targets._write(key, entry, replaces_same_event=True)  # `running`, as read
        assert await _state_refused(targets, instance_id, owner) == "stopping"
    finally:
        await redis.delete(key)
