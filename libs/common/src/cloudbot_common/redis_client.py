"""Redis clients with the deployment's timeouts, so that a stalled or dead Redis makes a
call fail promptly instead of hanging the request or task that made it."""

from __future__ import annotations

from typing import Any

from redis.asyncio import Redis

from cloudbot_common.settings import Settings


def redis_timeouts(settings: Settings) -> dict[str, Any]:
    seconds = settings.redis_socket_timeout_seconds
    return {"socket_connect_timeout": seconds, "socket_timeout": seconds}


def redis_client(settings: Settings, url: str | None = None, **options: Any) -> Redis:
    """An asyncio client of `url` (REDIS_URL by default) with those timeouts."""
    client: Redis = Redis.from_url(url or settings.redis_url, **redis_timeouts(settings), **options)
    return client
