"""State and session events on Redis pub/sub.

Postgres holds the truth (instance rows, the state history); these messages only tell
listeners (SSE streams, gateway sessions, ownership caches) to look again or to close.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import asdict, dataclass

from redis.asyncio import Redis

INSTANCE_EVENTS_CHANNEL = "cloudbot:events:instances"
SESSION_EVENTS_CHANNEL = "cloudbot:events:sessions"
_REVOKED_SESSION_KEY = "cloudbot:revoked-session:{}"


@dataclass(frozen=True, slots=True)
class InstanceStateEvent:
    event_id: int
    instance_id: str
    owner_id: str
    state: str
    reason: str | None = None

    def encode(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def decode(cls, raw: str | bytes) -> InstanceStateEvent:
        return cls(**json.loads(raw))


async def publish_instance_event(redis: Redis, event: InstanceStateEvent) -> None:
    await redis.publish(INSTANCE_EVENTS_CHANNEL, event.encode())


async def revoke_login_session(
    redis: Redis, session_id: uuid.UUID, *, remember_seconds: int
) -> None:
    """Mark a login session revoked for as long as its access tokens can live, and say so."""
    await redis.set(_REVOKED_SESSION_KEY.format(session_id), "1", ex=max(remember_seconds, 1))
    await redis.publish(SESSION_EVENTS_CHANNEL, json.dumps({"session_id": str(session_id)}))


async def is_login_session_revoked(redis: Redis, session_id: uuid.UUID) -> bool:
    return bool(await redis.exists(_REVOKED_SESSION_KEY.format(session_id)))
