"""Shared fixtures.

Two tiers (README, Tests):
- fast (`-m fast`, `make test-fast`): pure logic, and the API in this process through
  httpx's ASGI transport, each test inside one Postgres transaction that is rolled back
  at its end, so tests need no cleaning and leave nothing behind. A module joins it with
  `pytestmark = pytest.mark.fast`; its `http` client then talks to the in-process API and
  its `db` session sees, and is seen by, everything that API writes.
- the rest: real processes (the API under uvicorn, Celery workers, the gateway, moto,
  VNC) against a database and Redis db of the run's own, committed for real.

Every log written during the run is scanned for the secrets the tests used.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import dataclasses
import logging
import os
import secrets
from collections.abc import AsyncIterator, Iterator
from typing import TextIO

import httpx
import pytest
from fastapi import FastAPI
from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession, async_sessionmaker

from cloudbot_api.main import create_app
from cloudbot_api.resources import Resources
from cloudbot_common.db import create_engine
from cloudbot_common.logging import configure_logging
from cloudbot_common.settings import Settings
from tests.support.api import ApiServer, api_process
from tests.support.clients import api_client
from tests.support.databases import REDIS_BASE, REDIS_FIRST_DB, drop_database, flush_redis, migrate
from tests.support.databases import database_url as url_of
from tests.support.identity import certs_dir
from tests.support.leaks import SECRETS, SecretRegistry, find_leaks
from tests.support.processes import LOG_DIR
from tests.support.users import User, make_user

# Fixtures that start processes: a test that uses one is not fast.
PROCESS_FIXTURES = frozenset(
    {"api_server", "gateway", "copying_gateway", "desktop", "moto_url", "broker_url"}
)


# Settings made in the test process itself (and anything it starts without `base_env`)
# take the development secrets: say so, since an unset ENVIRONMENT means production.
os.environ.setdefault("ENVIRONMENT", "test")


def _worker_index() -> int:
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    return int(worker.removeprefix("gw") or 0)


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Fast tests run first; one that starts a process is a mistake, said at once."""
    for item in items:
        if item.get_closest_marker("fast") is None:
            continue
        slow = PROCESS_FIXTURES.intersection(getattr(item, "fixturenames", ()))
        if slow:
            raise pytest.UsageError(f"{item.nodeid} is marked fast but uses {sorted(slow)}")
    items.sort(key=lambda item: item.get_closest_marker("fast") is None)


@pytest.fixture(scope="session")
def secret_registry() -> SecretRegistry:
    return SECRETS


@pytest.fixture(scope="session")
def database_url() -> Iterator[str]:
    name = f"cloudbot_test_{_worker_index()}_{secrets.token_hex(4)}"
    url = url_of(name)
    migrate(url)
    yield url
    asyncio.run(drop_database(name))


# Redis dbs 1-7 are left to `private_env` (the shared test stack uses 8 and up).
_REDIS_SLOTS = {"metrics": 1, "flower": 2, "stack": 3, "scale": 4}


@pytest.fixture(scope="module")
def private_env(
    request: pytest.FixtureRequest, base_env: dict[str, str]
) -> Iterator[dict[str, str]]:
    """`base_env` with a freshly migrated database and an empty Redis db of its own: for
    services whose queue, outbox and instances must be theirs alone (the reconciler of a
    stack on the shared database would take up other tests' instances, and their workers
    its commands).

    The module names its slot with `REDIS_SLOT`, one of `_REDIS_SLOTS`."""
    slot = _REDIS_SLOTS[request.module.REDIS_SLOT] + _worker_index() * len(_REDIS_SLOTS)
    assert slot < 8, "too many xdist workers for the private Redis dbs"
    redis_url = f"{REDIS_BASE}/{slot}"
    asyncio.run(flush_redis(redis_url))
    name = f"cloudbot_private_{slot}_{secrets.token_hex(4)}"
    url = url_of(name)
    migrate(url)
    yield {**base_env, "DATABASE_URL": url, "REDIS_URL": redis_url}
    asyncio.run(drop_database(name))
    asyncio.run(flush_redis(redis_url))


@pytest.fixture(scope="session")
def redis_url() -> str:
    url = f"{REDIS_BASE}/{REDIS_FIRST_DB + _worker_index()}"
    asyncio.run(flush_redis(url))
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
        # EC2 machines prove themselves with documents the tests sign (AWS's key is AWS's).
        "INSTANCE_IDENTITY_CERTS_DIR": certs_dir(),
    }


@pytest.fixture(scope="session")
def settings(base_env: dict[str, str]) -> Settings:
    return Settings(**{k.lower(): v for k, v in base_env.items()})  # type: ignore[arg-type]


@pytest.fixture(scope="session")
async def db_engine(database_url: str) -> AsyncIterator[AsyncEngine]:
    """An engine on the run's database, for tests that write what other processes read."""
    engine = create_engine(Settings(database_url=database_url), pool_size=2)
    yield engine
    await engine.dispose()


@pytest.fixture
async def db_connection(db_engine: AsyncEngine) -> AsyncIterator[AsyncConnection]:
    """One connection in a transaction that is rolled back when the test ends."""
    async with db_engine.connect() as connection:
        transaction = await connection.begin()
        yield connection
        await transaction.rollback()


def _sessions_on(connection: AsyncConnection) -> async_sessionmaker[AsyncSession]:
    # Each session's commit only releases a savepoint of the test's transaction.
    return async_sessionmaker(
        bind=connection,
        expire_on_commit=False,
        autoflush=False,
        join_transaction_mode="create_savepoint",
    )


@pytest.fixture
def db_sessions(db_connection: AsyncConnection) -> async_sessionmaker[AsyncSession]:
    """Sessions inside the test's transaction (their commits are savepoints)."""
    return _sessions_on(db_connection)


@pytest.fixture
async def db(db_sessions: async_sessionmaker[AsyncSession]) -> AsyncIterator[AsyncSession]:
    """A session inside the test's transaction: what it writes the in-process API sees
    (flush first), and what that API commits it sees."""
    async with db_sessions() as session:
        yield session


# --- the API in this process (fast tier) ---


@pytest.fixture(scope="session")
def in_process_log() -> Iterator[TextIO]:
    LOG_DIR.mkdir(exist_ok=True)
    with (LOG_DIR / f"api-in-process-{os.getpid()}.log").open("w") as stream:
        yield stream


@pytest.fixture(scope="session")
async def _in_process_api(settings: Settings) -> AsyncIterator[tuple[FastAPI, Resources]]:
    """The API application, started by its own lifespan as uvicorn would start it, and
    the resources that made. Commands go to Celery's in-memory broker: no worker of this
    run may pick them up."""
    app = create_app(settings.model_copy(update={"celery_broker_url": "memory://"}))
    async with app.router.lifespan_context(app):
        yield app, app.state.resources


@pytest.fixture
async def api_app(
    _in_process_api: tuple[FastAPI, Resources],
    in_process_log: TextIO,
    db_connection: AsyncConnection,
    db_sessions: async_sessionmaker[AsyncSession],
) -> AsyncIterator[FastAPI]:
    """The API application in this process, its database sessions inside the test's
    transaction. While the test runs, this process logs as the API does, to a file in
    .test-logs that is scanned like every service's."""
    app, started = _in_process_api
    root = logging.getLogger()
    level = root.level
    configure_logging("api", level="DEBUG", json_output=True, stream=in_process_log)
    # Every session factory of the API (read-only ones too) and its read-only statements
    # work in the test's transaction.
    resources = copy.copy(started)
    for f in dataclasses.fields(resources):
        if isinstance(getattr(resources, f.name), async_sessionmaker):
            setattr(resources, f.name, db_sessions)
    resources.read_connections = lambda: contextlib.nullcontext(db_connection)
    app.state.resources = resources
    yield app
    for handler in [h for h in root.handlers if getattr(h, "stream", None) is in_process_log]:
        root.removeHandler(handler)
    root.setLevel(level)


# --- the API as a process (slow tier) ---


@pytest.fixture(scope="session")
def api_server(base_env: dict[str, str]) -> Iterator[ApiServer]:
    with api_process(base_env) as url:
        port = url.rsplit(":", 1)[1]
        yield ApiServer(url=url, env={**base_env, "API_PORT": port, "PUBLIC_API_URL": url})


@pytest.fixture
def api_transport(request: pytest.FixtureRequest) -> tuple[httpx.AsyncBaseTransport | None, str]:
    """Where `http` sends requests: the in-process API for fast tests, else the process."""
    if request.node.get_closest_marker("fast") is not None:
        app: FastAPI = request.getfixturevalue("api_app")
        return httpx.ASGITransport(app=app, client=("127.0.0.1", 50000)), "http://api.test"
    server: ApiServer = request.getfixturevalue("api_server")
    return None, server.url


@pytest.fixture
async def http(
    api_transport: tuple[httpx.AsyncBaseTransport | None, str],
) -> AsyncIterator[httpx.AsyncClient]:
    """A client of the API, with a client address of its own (rate limits are per
    address)."""
    transport, url = api_transport
    async with api_client(url, transport=transport) as client:
        yield client


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_url, decode_responses=True)
    yield client
    await client.aclose()


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
