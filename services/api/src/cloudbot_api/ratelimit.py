"""Rate limits shared by every API replica, on the `limits` library's Redis storage."""

from __future__ import annotations

import math
import time
from typing import Any

from limits import RateLimitItem, parse
from limits.aio.storage import RedisStorage
from limits.aio.strategies import MovingWindowRateLimiter
from redis.asyncio import ConnectionPool

from cloudbot_api.errors import ProblemError


class RateLimiter:
    def __init__(
        self, redis_url: str, *, enabled: bool = True, options: dict[str, Any] | None = None
    ) -> None:
        # A pool of our own (with `options`, e.g. timeouts), so that closing the limiter
        # closes its connections.
        self._pool = ConnectionPool.from_url(redis_url, **(options or {}))
        self._storage = RedisStorage(
            "async+" + redis_url,
            implementation="redispy",
            key_prefix="cloudbot:ratelimit",
            # limits types its options for URLs only; redis-py takes the pool as given.
            connection_pool=self._pool,  # type: ignore[arg-type]
        )
        self._limiter = MovingWindowRateLimiter(self._storage)
        self._enabled = enabled

    async def hit(self, limit: str, scope: str, *identifiers: str) -> None:
        """Count one hit against every identifier; refuse with 429 if any is over its limit.

        Each identifier (account, client address) has its own window, so a flood from one
        address cannot lock an account out from elsewhere for longer than its own window.
        """
        if not self._enabled:
            return
        item: RateLimitItem = parse(limit)
        for identifier in identifiers:
            if not await self._limiter.hit(item, scope, identifier):
                await self._refuse(item, scope, identifier)

    async def check(self, limit: str, scope: str, *identifiers: str) -> None:
        """Refuse with 429 if any identifier has used up its limit; count nothing. With
        `count` afterwards, for limits on outcomes (failed logins) rather than attempts."""
        if not self._enabled:
            return
        item: RateLimitItem = parse(limit)
        for identifier in identifiers:
            if not await self._limiter.test(item, scope, identifier):
                await self._refuse(item, scope, identifier)

    async def count(self, limit: str, scope: str, *identifiers: str) -> None:
        """Count one hit against every identifier, refusing nothing."""
        if not self._enabled:
            return
        item: RateLimitItem = parse(limit)
        for identifier in identifiers:
            await self._limiter.hit(item, scope, identifier)

    async def _refuse(self, item: RateLimitItem, scope: str, identifier: str) -> None:
        stats = await self._limiter.get_window_stats(item, scope, identifier)
        retry_after = max(1, math.ceil(stats.reset_time - time.time()))
        raise ProblemError(
            429,
            "rate_limited",
            "Too many requests; try again later.",
            headers={"Retry-After": str(retry_after)},
        )

    async def close(self) -> None:
        await self._pool.aclose()
