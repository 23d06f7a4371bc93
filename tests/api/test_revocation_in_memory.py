"""Attack: reuse an access token on another API replica the moment its login session ends.

Each API process keeps the revoked login sessions in memory, fed by the event hub, and
answers most checks without asking Redis. Two API processes: `a`, where users log in and
out, and `b`, where the stolen token is tried, whose Redis (the hub's subscription
included) goes through a fault proxy:

- with the proxy adding latency, `b` hears of every revocation late; the token must still
  be refused on `b` at once after the logout answered on `a`, with the checks answered
  from memory (its metrics say so): a check waits for the hub to have caught up;
- with `b`'s Redis gone (its subscription dropped, new connections refused), the token is
  refused all the same (Postgres's revoked_at); once Redis is back, a session ended
  meanwhile, whose message `b` never received, is refused from memory.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from urllib.parse import urlsplit

import httpx
import pytest
from redis.asyncio import Redis

from cloudbot_common.events import revoked_session_key
from cloudbot_common.security.jwt_tokens import TokenCodec, TokenType
from cloudbot_common.settings import Settings
from tests.support.clients import api_client
from tests.support.faultproxy import FaultProxy
from tests.support.problems import assert_problem
from tests.support.processes import PYTHON, free_port, http_ok, running
from tests.support.users import User, make_user, whoami
from tests.support.waiting import eventually

pytestmark = pytest.mark.slow

ROUNDS = 8
# Well under the hub's barrier timeout (a PING waits it each way, maybe twice).
LATENCY = 0.1


@dataclass(frozen=True)
class Replicas:
    a: str
    b: str
    b_metrics: str
    b_redis: FaultProxy


def _api(name: str, env: dict[str, str]) -> Iterator[tuple[str, str]]:
    port, metrics = free_port(), free_port()
    url = f"http://127.0.0.1:{port}"
    with running(
        name,
        [PYTHON, "-m", "cloudbot_api"],
        {**env, "API_PORT": str(port), "API_METRICS_PORT": str(metrics), "PUBLIC_API_URL": url},
        ready=http_ok(f"{url}/healthz"),
    ):
        yield url, f"http://127.0.0.1:{metrics}/metrics"


@pytest.fixture(scope="module")
def replicas(base_env: dict[str, str], redis_url: str) -> Iterator[Replicas]:
    parts = urlsplit(redis_url)
    # Logins in a loop; the limits are not what is tested here.
    env = {**base_env, "RATE_LIMIT_ENABLED": "false"}
    with FaultProxy(parts.port or 6379) as proxy:
        b_env = {**env, "REDIS_URL": f"redis://127.0.0.1:{proxy.port}{parts.path}"}
        for a, _ in _api("api-revocations-a", env):
            for b, b_metrics in _api("api-revocations-b", b_env):
                yield Replicas(a, b, b_metrics, proxy)


def checks(metrics_url: str) -> dict[str, float]:
    """B's revocation checks so far, by what answered them."""
    text = httpx.get(metrics_url, timeout=10).text
    found = re.findall(r'^cloudbot_revocation_checks_total\{by="(\w+)"\} (\S+)$', text, re.M)
    return {by: float(n) for by, n in found}


async def log_in(http: httpx.AsyncClient, user: User) -> str:
    r = await http.post("/api/auth/login", json={"email": user.email, "password": user.password})
    assert r.status_code == 200, r.text
    return str(r.json()["access_token"])


async def from_memory_on_b(replicas: Replicas, b: httpx.AsyncClient, token: str) -> None:
    """Wait until `b` answers checks from memory again (its hub subscribed, markers read)."""
    before = checks(replicas.b_metrics).get("memory", 0)

    async def answered_from_memory() -> bool:
        assert (await whoami(b, token)).status_code == 200
        return checks(replicas.b_metrics).get("memory", 0) > before

    await eventually(answered_from_memory, timeout=30, what="checks answered from memory")


async def test_a_token_is_refused_on_another_replica_at_once_after_logout(
    replicas: Replicas,
) -> None:
    async with api_client(replicas.a) as a, api_client(replicas.b) as b:
        user = await make_user(a)
        await from_memory_on_b(replicas, b, user.access_token)
        replicas.b_redis.set_latency(LATENCY)
        try:
            before = checks(replicas.b_metrics)
            for _ in range(ROUNDS):
                token = await log_in(a, user)
                assert (await whoami(b, token)).status_code == 200
                r = await a.post("/api/auth/logout", headers={"Authorization": f"Bearer {token}"})
                assert r.status_code == 204, r.text
                # B hears of it LATENCY later; its answer must not come before.
                assert_problem(await whoami(b, token), 401, "unauthorized")
            after = checks(replicas.b_metrics)
        finally:
            replicas.b_redis.restore()
    # Both checks of every round were answered by B's memory, not by asking Redis.
    assert after.get("memory", 0) - before.get("memory", 0) >= 2 * ROUNDS, (before, after)
    assert after.get("redis", 0) == before.get("redis", 0), (before, after)


async def test_without_its_hub_a_replica_still_refuses_and_learns_what_it_missed(
    replicas: Replicas,
) -> None:
    async with api_client(replicas.a) as a, api_client(replicas.b) as b:
        user = await make_user(a)
        await from_memory_on_b(replicas, b, user.access_token)
        ended = await log_in(a, user)
        assert (await whoami(b, ended)).status_code == 200
        before = checks(replicas.b_metrics)
        replicas.b_redis.kill()  # the subscription drops; Redis refuses B from now on
        try:
            r = await a.post("/api/auth/logout", headers={"Authorization": f"Bearer {ended}"})
            assert r.status_code == 204, r.text
            assert_problem(await whoami(b, ended), 401, "unauthorized")
            assert checks(replicas.b_metrics).get("database", 0) > before.get("database", 0)
        finally:
            replicas.b_redis.restore()
        # The logout's message never reached B; the markers read on subscribing again say it.
        await from_memory_on_b(replicas, b, user.access_token)
        memory = checks(replicas.b_metrics).get("memory", 0)
        assert_problem(await whoami(b, ended), 401, "unauthorized")
        assert checks(replicas.b_metrics).get("memory", 0) > memory


async def test_a_revocation_whose_marker_redis_lost_is_known_after_subscribing_again(
    replicas: Replicas, redis: Redis, settings: Settings
) -> None:
    """Redis restarted without its data: the markers are gone, and the hub subscribes
    again. What is loaded then comes from Postgres too, so a session ended before is
    still refused from memory, not let through as one nobody revoked."""
    async with api_client(replicas.a) as a, api_client(replicas.b) as b:
        user = await make_user(a)
        await from_memory_on_b(replicas, b, user.access_token)
        ended = await log_in(a, user)
        replicas.b_redis.kill()  # B's subscription drops: it never hears of the logout
        try:
            r = await a.post("/api/auth/logout", headers={"Authorization": f"Bearer {ended}"})
            assert r.status_code == 204, r.text
            session_id = TokenCodec(settings).decode(ended, TokenType.ACCESS).session_id
            assert await redis.delete(revoked_session_key(session_id)) == 1
        finally:
            replicas.b_redis.restore()
        await from_memory_on_b(replicas, b, user.access_token)
        memory = checks(replicas.b_metrics).get("memory", 0)
        assert_problem(await whoami(b, ended), 401, "unauthorized")
        assert checks(replicas.b_metrics).get("memory", 0) > memory
