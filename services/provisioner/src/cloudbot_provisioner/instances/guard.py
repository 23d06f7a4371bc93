"""One handler at a time per instance, across every worker process and host.

Duplicate deliveries are expected (the relay republishes, a killed worker's message comes
back), and two handlers acting on one instance at once could launch two machines. A
Postgres session advisory lock serialises them without holding a row lock (and the API's
requests) during slow cloud calls; if the worker dies, its connection drops and Postgres
releases the lock.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

# First key of the two-key advisory lock form: the namespace of instance locks.
_NAMESPACE = 0x43424931  # "CBI1"


def _key(instance_id: uuid.UUID) -> int:
    return int.from_bytes(instance_id.bytes[:4], "big", signed=True)


@asynccontextmanager
async def exclusive(engine: AsyncEngine, instance_id: uuid.UUID) -> AsyncIterator[bool]:
    """Yields True when this caller holds the instance, False when another one does."""
    params = {"ns": _NAMESPACE, "key": _key(instance_id)}
    async with engine.connect() as conn:
        held = bool(await conn.scalar(text("SELECT pg_try_advisory_lock(:ns, :key)"), params))
        await conn.commit()
        try:
            yield held
        finally:
            if held:
                try:
                    await conn.execute(text("SELECT pg_advisory_unlock(:ns, :key)"), params)
                    await conn.commit()
                except BaseException:
                    # Never return a connection that may still hold the lock to the pool.
                    await conn.invalidate()
                    raise
