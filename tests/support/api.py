"""The API as a process: the one the tests share, and ones of a test's own."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

from tests.support.processes import PYTHON, free_port, http_ok, running


@dataclass(frozen=True)
class ApiServer:
    """The API process the tests share: its address and the environment it runs with."""

    url: str
    env: dict[str, str]


@contextlib.contextmanager
def api_process(env: dict[str, str], name: str = "api") -> Iterator[str]:
    """The API with these settings; yields its base URL (also its PUBLIC_API_URL)."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with running(
        name,
        [PYTHON, "-m", "cloudbot_api"],
        {**env, "API_PORT": str(port), "PUBLIC_API_URL": url},
        ready=http_ok(f"{url}/healthz"),
    ):
        yield url
