"""Exactly one beat schedules: a second beat started by mistake stands by (the relay and
the reconciler are not sent twice as often), and takes over when the first one dies."""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Iterator
from typing import cast

import pytest
from redis import Redis

from tests.support.harness import RedisServer, redis_server
from tests.support.processes import wait_for
from tests.support.supervisor import Supervisor

pytestmark = pytest.mark.slow

RECONCILE = "cloudbot.provisioner.reconcile"


@pytest.fixture
def broker() -> Iterator[RedisServer]:
    with redis_server() as server:
        yield server


def queued(redis: Redis) -> Counter[str]:
    """The periodic tasks waiting in the queue (no worker takes them here), by name."""
    messages = cast(list[bytes], redis.lrange("provisioning", 0, -1))
    return Counter(json.loads(raw)["headers"]["task"] for raw in messages)


def sending(supervisor: Supervisor, name: str) -> int:
    proc = supervisor[name].proc
    assert proc is not None
    return proc.log_text().count("Sending due task reconcile")


def test_a_second_beat_stands_by_and_takes_over(base_env, broker, tmp_path):
    env = {
        **base_env,
        "REDIS_URL": broker.url,
        "CELERY_BROKER_URL": broker.url,
        "RECONCILE_INTERVAL_SECONDS": "1",
        "BEAT_LOCK_TTL_SECONDS": "3",
    }
    supervisor = Supervisor(env, tmp_path)
    supervisor.beat("beat-a")
    supervisor.beat("beat-b")
    redis = Redis.from_url(broker.url)
    with supervisor.running():
        window = 6.0
        start = time.monotonic()
        redis.delete("provisioning")
        time.sleep(window)
        sent = queued(redis)[RECONCILE]
        elapsed = time.monotonic() - start
        # Once a second (the period), not twice: one beat sends, the other stands by.
        assert window - 2 <= sent <= elapsed + 1, sent
        a, b = sending(supervisor, "beat-a"), sending(supervisor, "beat-b")
        assert min(a, b) == 0, (a, b)
        holder, standby = ("beat-a", "beat-b") if a else ("beat-b", "beat-a")

        # The holder dies without releasing: the other takes over once the lock expires.
        supervisor[holder].kill()
        wait_for(lambda: sending(supervisor, standby) > 0, 10, "the standby beat to schedule")
        assert "standing by" in supervisor[standby].proc.log_text()  # type: ignore[union-attr]
    redis.close()
