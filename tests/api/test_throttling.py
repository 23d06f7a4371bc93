"""Rate limits by client address: who the client is behind the trusted proxy, and how an
IPv6 client is counted. (The tests' trusted proxy is 127.0.0.1, see `base_env`.)"""

from __future__ import annotations

import secrets
import uuid

import httpx

from tests.support.clients import fake_client_address


def signup_body() -> dict[str, str]:
    return {"email": f"rl-{uuid.uuid4().hex[:10]}@example.com", "password": "long enough pass"}


def random_v6_64() -> str:
    """A /64 of the documentation range of its own, as `2001:db8:xxxx:yyyy:`."""
    return f"2001:db8:{secrets.randbelow(0xFFFF):x}:{secrets.randbelow(0xFFFF):x}:"


async def signups(url: str, header_lines: list[list[tuple[str, str]]]) -> list[int]:
    async with httpx.AsyncClient(base_url=url) as client:
        return [
            (await client.post("/api/auth/signup", json=signup_body(), headers=lines)).status_code
            for lines in header_lines
        ]


async def test_forwarded_for_is_read_across_its_header_lines(api_server):
    # A client sends X-Forwarded-For lines of its own choosing; the proxy appends the line
    # with the address it saw. Read as one list, the proxy's hop is the last one.
    real = fake_client_address()
    lines = [
        [("X-Forwarded-For", f"198.51.100.{i + 1}"), ("X-Forwarded-For", real)] for i in range(6)
    ]
    assert await signups(api_server.url, lines) == [201] * 5 + [429]


async def test_forwarded_for_lines_and_commas_are_one_list(api_server):
    real = fake_client_address()
    lines = [
        [("X-Forwarded-For", f"198.51.100.{i + 1}, 192.0.2.{i + 1}"), ("X-Forwarded-For", real)]
        for i in range(6)
    ]
    assert await signups(api_server.url, lines) == [201] * 5 + [429]


async def test_ipv6_clients_are_limited_per_64(api_server):
    prefix = random_v6_64()
    # Six addresses of one /64, as a client rotating through its own prefix would.
    lines = [
        [("X-Forwarded-For", f"{prefix}{secrets.randbelow(0xFFFF):x}::{i + 1}")] for i in range(6)
    ]
    assert await signups(api_server.url, lines) == [201] * 5 + [429]
    # Another /64 is another client.
    assert await signups(api_server.url, [[("X-Forwarded-For", f"{random_v6_64()}:1")]]) == [201]
