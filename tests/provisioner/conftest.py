from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest

from cloudbot_common.settings import Settings
from tests.provisioner.harness import AWS_ENV, FAST_RETRIES, Db, moto_server


@pytest.fixture(scope="session")
def moto_url() -> Iterator[str]:
    with moto_server() as url:
        yield url


@pytest.fixture(scope="session")
def ec2_env(base_env: dict[str, str], moto_url: str) -> dict[str, str]:
    """A provisioner driving EC2, with moto as the endpoint."""
    return {
        **base_env,
        **AWS_ENV,
        **FAST_RETRIES,
        "LOCAL_DEV_MODE": "false",
        "AWS_ENDPOINT_URL": moto_url,
    }


@pytest.fixture
async def db(database_url: str, settings: Settings) -> AsyncIterator[Db]:
    database = Db(database_url, settings)
    yield database
    await database.close()
