"""One beat schedules, however many are started.

Two beats would send every periodic task twice: the relay and the reconciler would run
twice as often and act twice on what they find. So the scheduling beat holds a lock in
Redis (a random token under the control plane's key, with an expiry) and renews it every
third of its lifetime; any other beat stands by, sends nothing, and takes over once the
holder is gone (it released the lock on a clean stop, or its lock expired). A beat that
cannot renew (Redis away) stops sending at once, well before its lock can expire, so two
beats never schedule at the same time.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from typing import Any

from celery.beat import PersistentScheduler
from redis import Redis
from redis.exceptions import RedisError

from cloudbot_common.logging import get_logger
from cloudbot_common.redis_client import redis_timeouts
from cloudbot_common.settings import get_settings

log = get_logger(__name__)

# Take the lock if it is free, or renew it if it is ours: 1 if held afterwards, else 0.
_HOLD = """
if redis.call('set', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return 1 end
if redis.call('get', KEYS[1]) == ARGV[1] then
  redis.call('pexpire', KEYS[1], ARGV[2])
  return 1
end
return 0
"""
_RELEASE = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end
return 0
"""


class SingleBeatScheduler(PersistentScheduler):  # type: ignore[misc]
    """Celery's persistent scheduler, sending only while it holds the beat lock."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        settings = get_settings()
        self._ttl = float(settings.beat_lock_ttl_seconds)
        self._key = f"cloudbot:beat-lock:{settings.control_plane_id}"
        self._token = uuid.uuid4().hex
        self._redis = Redis.from_url(settings.redis_url, **redis_timeouts(settings))
        self._hold = self._redis.register_script(_HOLD)
        self._release = self._redis.register_script(_RELEASE)
        # Trusted until this monotonic time: a third of the lifetime after the last renewal.
        self._held_until = 0.0
        self._holding: bool | None = None  # None: not yet known
        super().__init__(*args, **kwargs)

    def tick(self, *args: Any, **kwargs: Any) -> float:
        if not self._lock():
            return self._ttl / 3
        return float(min(super().tick(*args, **kwargs), self._ttl / 3))

    def _lock(self) -> bool:
        now = time.monotonic()
        if now < self._held_until:
            return True
        try:
            held = bool(self._hold(keys=[self._key], args=[self._token, int(self._ttl * 1000)]))
        except RedisError:
            held = False
        if held != self._holding:
            if held:
                log.info("beat holds the schedule lock; scheduling")
            else:
                log.warning("another beat holds the schedule lock, or Redis is away; standing by")
        self._holding = held
        self._held_until = now + self._ttl / 3 if held else 0.0
        return held

    def close(self) -> None:
        try:
            super().close()
        finally:
            if self._holding:
                with contextlib.suppress(RedisError):  # else it expires by itself
                    self._release(keys=[self._key], args=[self._token])
            self._redis.close()
