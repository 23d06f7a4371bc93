"""Instances through the API, and the provisioner's part played by hand where a test has
no worker running."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession

from cloudbot_common.events import InstanceStateEvent, publish_instance_event
from cloudbot_common.lifecycle import lock_instance, transition
from cloudbot_common.models import Instance, InstanceState
from cloudbot_common.security.opaque import new_token, token_digest
from tests.support.identity import aws_proof, local_proof
from tests.support.leaks import SECRETS
from tests.support.users import User

# Where rows are written: the run's database (an engine; committed for every process to
# see) or a fast test's connection (committed as a savepoint of the test's transaction).
Bind = AsyncEngine | AsyncConnection


def _session(bind: Bind) -> AsyncSession:
    return AsyncSession(bind, expire_on_commit=False, join_transaction_mode="create_savepoint")


async def create(
    http: httpx.AsyncClient, user: User, name: str = "desk", size: str = "small", **headers: str
) -> httpx.Response:
    return await http.post(
        "/api/instances", json={"name": name, "size": size}, headers={**user.headers, **headers}
    )


async def move(
    bind: Bind, redis: Redis | None, instance_id: uuid.UUID | str, *states: InstanceState
) -> list[InstanceStateEvent]:
    """Move the instance through `states` the one way the provisioner does: a transition
    committed, then its event published (with `redis` None, only returned)."""
    events = []
    for state in states:
        async with _session(bind) as session, session.begin():
            row = await lock_instance(session, uuid.UUID(str(instance_id)))
            assert row is not None
            event = await transition(session, row, state)
        if redis is not None:
            await publish_instance_event(redis, event)
        events.append(event)
    return events


async def give_bootstrap_token(bind: Bind, instance_id: uuid.UUID | str, ttl: int = 600) -> str:
    """What the provisioner does at launch: mint a token and keep only its digest, and
    record the machine (unless one is recorded already)."""
    token = new_token("cbb_")
    SECRETS.add(token)
    async with _session(bind) as session, session.begin():
        row = await session.get(Instance, uuid.UUID(str(instance_id)))
        assert row is not None
        row.bootstrap_token_hash = token_digest(token)
        row.bootstrap_expires_at = datetime.now(UTC) + timedelta(seconds=ttl)
        if row.backend_instance_id is None:
            local = row.backend == "local"
            row.backend_instance_id = f"local-{row.id}" if local else f"i-{uuid.uuid4().hex[:17]}"
    return token


async def machine_proof(bind: Bind, instance_id: uuid.UUID | str) -> dict[str, Any]:
    """The body with which the instance's recorded machine proves itself at bootstrap."""
    async with _session(bind) as session:
        row = await session.get(Instance, uuid.UUID(str(instance_id)))
        assert row is not None
        assert row.backend_instance_id is not None
        if row.backend == "local":
            return local_proof(str(row.id), row.backend_instance_id)
        return aws_proof(row.backend_instance_id)


async def read_sse_lines(lines: AsyncIterator[str], count: int) -> list[dict[str, str]]:
    """The next `count` Server-Sent Events (fewer if the stream ends), comments skipped."""
    events: list[dict[str, str]] = []
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
