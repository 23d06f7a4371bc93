"""When someone last used a machine through the gateway, for idle stop.

Gateway replicas mark each instance with a live desktop or agent session every little
while (and when a session opens or closes); the provisioner's idle sweep reads the marks.
A mark is a Unix time in a Redis key that lives a day: losing it (Redis restarted) only
makes a machine look as idle as its own heartbeats say, never busier.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Collection
from datetime import UTC, datetime
from typing import Any

from redis.asyncio import Redis

_KEY = "cloudbot:instance-activity:{}"
_TTL_SECONDS = 24 * 3600


def mark(pipe: Any, instance_ids: Collection[uuid.UUID], at: float | None = None) -> None:
    """Queue marks of `instance_ids` as used now on a Redis pipeline (or client)."""
    stamp = at if at is not None else time.time()
    for instance_id in instance_ids:
        pipe.set(_KEY.format(instance_id), f"{stamp:.3f}", ex=_TTL_SECONDS)


async def last_used(redis: Redis, instance_ids: list[uuid.UUID]) -> dict[uuid.UUID, datetime]:
    """The last mark of each instance that has one."""
    if not instance_ids:
        return {}
    values = await redis.mget([_KEY.format(i) for i in instance_ids])
    return {
        i: datetime.fromtimestamp(float(v), UTC)
        for i, v in zip(instance_ids, values, strict=True)
        if v is not None
    }
