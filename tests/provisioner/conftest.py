from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest

from tests.support.harness import (
    AWS_ENV,
    FAST_RETRIES,
    Db,
    moto_network,
    moto_server,
    redis_server,
)


@pytest.fixture(scope="session")
def moto_url() -> Iterator[str]:
    with moto_server() as url:
        yield url


@pytest.fixture(scope="session")
def broker_url() -> Iterator[str]:
    """A Celery broker of this run's own: the queue is shared with nobody else."""
    with redis_server() as server:
        yield server.url


@pytest.fixture(scope="session")
def worker_env(base_env: dict[str, str], broker_url: str) -> dict[str, str]:
    return {**base_env, **FAST_RETRIES, "CELERY_BROKER_URL": broker_url}


@pytest.fixture(scope="session")
def ec2_env(worker_env: dict[str, str], moto_url: str) -> dict[str, str]:
    """A provisioner driving EC2, with moto as the endpoint."""
    return {
        **worker_env,
        **AWS_ENV,
        "LOCAL_DEV_MODE": "false",
        "AWS_ENDPOINT_URL": moto_url,
        **moto_network(moto_url),
    }


@pytest.fixture
async def store(database_url: str, broker_url: str) -> AsyncIterator[Db]:
    """The run's database and this run's broker, as the provisioner tests drive them
    (instances requested through the API's own path; `db` is the fast tier's session)."""
    database = Db(database_url, broker_url)
    yield database
    await database.close()
