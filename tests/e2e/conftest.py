"""Fixtures shared by the flows across services: a moto server and a Celery broker of the
module's own, and a client for the module's `api_url`."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import httpx
import pytest

from tests.support.clients import api_client
from tests.support.harness import moto_server, redis_server


@pytest.fixture(scope="module")
def moto_url() -> Iterator[str]:
    with moto_server() as url:
        yield url


@pytest.fixture(scope="module")
def broker_url() -> Iterator[str]:
    with redis_server() as server:
        yield server.url


@pytest.fixture
async def client(api_url: str) -> AsyncIterator[httpx.AsyncClient]:
    async with api_client(api_url) as c:
        yield c
