"""HTTP clients for the API under test."""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import AsyncIterator

import httpx


def fake_client_address() -> str:
    """A client address of its own, sent as X-Forwarded-For through the trusted test
    proxy, so that per-address rate limits never couple tests."""
    return f"10.{secrets.randbelow(250)}.{secrets.randbelow(250)}.{secrets.randbelow(250) + 1}"


@contextlib.asynccontextmanager
async def api_client(
    url: str, timeout: float = 15, transport: httpx.AsyncBaseTransport | None = None
) -> AsyncIterator[httpx.AsyncClient]:
    """A client of the API at `url` (or behind `transport`), with an address of its own."""
    async with httpx.AsyncClient(
        transport=transport,
        base_url=url,
        timeout=timeout,
        headers={"X-Forwarded-For": fake_client_address()},
    ) as client:
        yield client
