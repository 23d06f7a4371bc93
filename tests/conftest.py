"""Shared fixtures: a fresh Postgres database and Redis db per test run (and per xdist
worker), the real API as a uvicorn process, and a scan of every log for secrets."""

from __future__ import annotations

import asyncio
import os
import secrets
import subprocess
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field

import asyncpg
import httpx
import pytest
from redis.asyncio import Redis

from cloudbot_common.settings import Settings
from tests.support.clients import api_client
from tests.support.leaks import find_leaks
from tests.support.processes import LOG_DIR, PYTHON, free_port, http_ok, running

PG_ADMIN = os.environ.get("TEST_PG_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_BASE = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379")
# First Redis db the run uses (one per xdist worker from there), so that two runs on one
# machine can keep apart.
REDIS_FIRST_DB = int(os.environ.get("TEST_REDIS_DB", "8"))


# Settings made in the test process itself (and anything it starts without `base_env`)
# take the development secrets: say so, since an unset ENVIRONMENT means production.
os.environ.setdefault("ENVIRONMENT", "test")


def _worker_index() -> int:
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    return int(worker.removeprefix("gw") or 0)


@dataclass
class SecretRegistry:
    """Every secret a test handles; none may appear in any log of the run."""

    values: set[str] = field(default_factory=set)

    def add(self, *values: str) -> None:
        self.values.update(v for v in values if v and len(v) >= 8)


SECRETS = SecretRegistry()


@pytest.fixture(scope="session")
def secret_registry() -> SecretRegistry:
    return SECRETS


@pytest.fixture(scope="session")
def database_url() -> Iterator[str]:
    name = f"cloudbot_test_{_worker_index()}_{secrets.token_hex(4)}"

    async def admin(sql: str) -> None:
        conn = await asyncpg.connect(PG_ADMIN)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    asyncio.run(admin(f'CREATE DATABASE "{name}"'))
    url = f"postgresql+asyncpg://postgres@127.0.0.1:5432/{name}"
    subprocess.run(
        [PYTHON, "-m", "cloudbot_common.migrate", "upgrade", "head"],
        env={**os.environ, "ENVIRONMENT": "test", "DATABASE_URL": url},
        check=True,
    )
    yield url
    asyncio.run(admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture(scope="session")
def redis_url() -> str:
    url = f"{REDIS_BASE}/{REDIS_FIRST_DB + _worker_index()}"

    async def flush() -> None:
        r = Redis.from_url(url)
        await r.flushdb()
        await r.aclose()

    asyncio.run(flush())
    return url


@pytest.fixture(scope="session")
def base_env(database_url: str, redis_url: str) -> dict[str, str]:
    """Environment for every service process the tests start."""
    return {
        "ENVIRONMENT": "test",
        "DATABASE_URL": database_url,
        "REDIS_URL": redis_url,
        "LOG_JSON": "true",
        "LOG_LEVEL": "DEBUG",
        # Tests act as many clients through one trusted proxy (X-Forwarded-For).
        "TRUSTED_PROXIES": "127.0.0.1/32",
        "CORS_ORIGINS": "http://app.test",
        "ALLOWED_WS_ORIGINS": "http://app.test",
        "CONTROL_PLANE_ID": f"cloudbot-test-{secrets.token_hex(3)}",
        "LOCAL_STATE_DIR": str(LOG_DIR.parent / ".local" / f"test-{os.getpid()}"),
        "OUTBOX_RELAY_AFTER_SECONDS": "3",
        "RECONCILE_INTERVAL_SECONDS": "2",
        # A killed beat's schedule lock frees in seconds, not the default half minute.
        "BEAT_LOCK_TTL_SECONDS": "3",
        # No metrics listeners unless a test asks for one on a free port: the defaults
        # (9100, 9101) would collide between the services of parallel runs.
        # Reusing a refresh token from the same client at once is a reuse here, as the
        # tests of reuse expect; the retry window has tests of its own (test_refresh_retry).
        "REFRESH_RETRY_SECONDS": "0",
        "API_METRICS_PORT": "0",
        "GATEWAY_METRICS_PORT": "0",
    }


@pytest.fixture(scope="session")
def settings(base_env: dict[str, str]) -> Settings:
    return Settings(**{k.lower(): v for k, v in base_env.items()})  # type: ignore[arg-type]


@dataclass(frozen=True)
class ApiServer:
    url: str
    env: dict[str, str]


@pytest.fixture(scope="session")
def api_server(base_env: dict[str, str]) -> Iterator[ApiServer]:
    port = free_port()
    env = {**base_env, "API_PORT": str(port), "PUBLIC_API_URL": f"http://127.0.0.1:{port}"}
    with running(
        "api",
        [PYTHON, "-m", "cloudbot_api"],
        env,
        ready=http_ok(f"http://127.0.0.1:{port}/healthz"),
    ):
        yield ApiServer(url=f"http://127.0.0.1:{port}", env=env)


@pytest.fixture
async def http(api_server: ApiServer) -> AsyncIterator[httpx.AsyncClient]:
    async with api_client(api_server.url) as client:
        yield client


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_url, decode_responses=True)
    yield client
    await client.aclose()


@dataclass
class User:
    email: str
    password: str
    access_token: str
    refresh_token: str

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.access_token}"}


async def make_user(http: httpx.AsyncClient, registry: SecretRegistry | None = None) -> User:
    email = f"user-{uuid.uuid4().hex[:12]}@example.com"
    password = "correct horse battery " + secrets.token_urlsafe(12)
    r = await http.post("/api/auth/signup", json={"email": email, "password": password})
    assert r.status_code == 201, r.text
    r = await http.post("/api/auth/login", json={"email": email, "password": password})
    assert r.status_code == 200, r.text
    tokens = r.json()
    user = User(email, password, tokens["access_token"], tokens["refresh_token"])
    (registry or SECRETS).add(password, user.access_token, user.refresh_token)
    return user


@pytest.fixture
async def user(http: httpx.AsyncClient) -> User:
    return await make_user(http)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Fail the run if any log written during it holds a secret a test used, or anything
    shaped like one of our tokens."""
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if worker:
        # Hand this worker's secrets to the controller, which scans once all are done.
        LOG_DIR.mkdir(exist_ok=True)
        (LOG_DIR / f"secrets-{worker}.txt").write_text("\n".join(SECRETS.values))
        return
    if not LOG_DIR.exists():
        return
    values = set(SECRETS.values)
    for handed in LOG_DIR.glob("secrets-*.txt"):
        values.update(v for v in handed.read_text().splitlines() if v)
        handed.unlink()
    leaks = find_leaks(LOG_DIR, values)
    if leaks:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.write_line(f"SECRETS FOUND IN LOGS ({len(leaks)}):", red=True)
            for leak in leaks[:20]:
                reporter.write_line("  " + leak, red=True)


def pytest_sessionstart(session: pytest.Session) -> None:
    if not os.environ.get("PYTEST_XDIST_WORKER") and LOG_DIR.exists():
        for path in [*LOG_DIR.glob("*.log"), *LOG_DIR.glob("secrets-*.txt")]:
            path.unlink()
