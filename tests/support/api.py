"""The API as a process: the one the tests share, and ones of a test's own."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

import httpx

from tests.support.clients import api_client
from tests.support.processes import PYTHON, free_port, http_ok, running


@dataclass(frozen=True)
class ApiServer:
    """The API process the tests share: its address and the environment it runs with."""

    url: str
    env: dict[str, str]


@contextlib.asynccontextmanager
async def api_process(
    base_env: dict[str, str], name: str = "api-variant", **overrides: str
) -> AsyncIterator[httpx.AsyncClient]:
    """Run the API with `overrides` on top of `base_env`; yield a client of it."""
    port = free_port()
    env = {**base_env, **overrides, "API_PORT": str(port)}
    with running(
        name, [PYTHON, "-m", "cloudbot_api"], env, ready=http_ok(f"http://127.0.0.1:{port}/healthz")
    ):
        async with api_client(f"http://127.0.0.1:{port}", timeout=30) as client:
            yield client
