"""Per-user limits that hold across replicas: each open thing (a gateway relay session, an
API event stream) holds a lease in a Redis sorted set per user (member: its id, score: the
lease's expiry), renewed while it lives, so a replica that dies without cleaning up frees
its leases within `lease_seconds`. Redis's clock is the one clock every replica agrees on.
"""

from __future__ import annotations

from typing import Any

from redis.asyncio import Redis

# Drop expired leases, then add ours if the user is under the limit.
_ACQUIRE = """
local now = tonumber(redis.call('TIME')[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[1]) then return 0 end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[3])
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[2]) * 2)
return 1
"""
_RENEW = """
local now = tonumber(redis.call('TIME')[1])
redis.call('ZADD', KEYS[1], 'XX', now + tonumber(ARGV[1]), ARGV[2])
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[1]) * 2)
return 1
"""


class Leases:
    def __init__(self, redis: Redis, key_format: str, lease_seconds: int) -> None:
        """`key_format` names the sorted set of one user, e.g. "cloudbot:x:{}"."""
        self._redis = redis
        self._key = key_format
        self.lease_seconds = lease_seconds
        self._acquire = redis.register_script(_ACQUIRE)
        self._renew = redis.register_script(_RENEW)

    async def acquire(self, user: object, member: str, limit: int) -> bool:
        """Take a lease for `member` unless `user` already holds `limit` live ones."""
        granted = await self._acquire(
            keys=[self._key.format(user)], args=[limit, self.lease_seconds, member]
        )
        return bool(granted)

    async def renew(self, user: object, member: str, *, client: Any = None) -> None:
        """Extend a lease (queued on `client`, a pipeline, when given)."""
        await self._renew(
            keys=[self._key.format(user)], args=[self.lease_seconds, member], client=client
        )

    async def release(self, user: object, member: str) -> None:
        await self._redis.zrem(self._key.format(user), member)
