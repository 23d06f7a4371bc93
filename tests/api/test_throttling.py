"""Rate limits by client address and account: who the client is behind the trusted proxy,
how an IPv6 client is counted, and login throttling that cannot lock an owner out. (The
tests' trusted proxy is 127.0.0.1, see `base_env`.)"""

from __future__ import annotations

import secrets
import uuid
from collections.abc import Iterator

import httpx
import pytest

from tests.support.api import api_process
from tests.support.clients import api_client, fake_client_address
from tests.support.users import make_user

FAILURES_PER_ADDRESS = 3
FAILURES_PER_ACCOUNT = 8


@pytest.fixture(scope="module")
def strict_api(base_env: dict[str, str]) -> Iterator[str]:
    """The API with low login-failure limits, so that tests reach them quickly."""
    env = {
        **base_env,
        "RATE_LIMIT_LOGIN_FAILURES": f"{FAILURES_PER_ADDRESS}/minute",
        "RATE_LIMIT_LOGIN_ACCOUNT_FAILURES": f"{FAILURES_PER_ACCOUNT}/minute",
    }
    with api_process(env, "api-throttling") as url:
        yield url


async def login(client: httpx.AsyncClient, email: str, password: str, **kw) -> int:
    r = await client.post("/api/auth/login", json={"email": email, "password": password}, **kw)
    if r.status_code == 429:
        assert r.json()["code"] == "rate_limited"
        assert int(r.headers["retry-after"]) >= 1
    return r.status_code


async def test_wrong_passwords_from_one_address_do_not_lock_the_owner_out(strict_api):
    async with api_client(strict_api) as http:
        owner = await make_user(http)
    attacker = {"X-Forwarded-For": fake_client_address()}
    async with httpx.AsyncClient(base_url=strict_api) as client:
        statuses = [
            await login(client, owner.email, "wrong password!", headers=attacker)
            for _ in range(FAILURES_PER_ADDRESS + 3)
        ]
        assert statuses == [401] * FAILURES_PER_ADDRESS + [429] * 3
        # Locked out at that address, even with the right password...
        assert await login(client, owner.email, owner.password, headers=attacker) == 429
    # ...while the owner, connecting from another address, gets in.
    second_source = httpx.AsyncHTTPTransport(local_address="127.0.0.2")
    async with httpx.AsyncClient(base_url=strict_api, transport=second_source) as client:
        assert await login(client, owner.email, owner.password) == 200
    async with api_client(strict_api) as elsewhere:
        assert await login(elsewhere, owner.email, owner.password) == 200


async def test_only_failures_count_against_an_account(strict_api):
    async with api_client(strict_api) as http:
        owner = await make_user(http)
        for _ in range(FAILURES_PER_ADDRESS + 2):
            assert await login(http, owner.email, owner.password) == 200
        assert await login(http, owner.email, "wrong password!") == 401


async def test_login_rate_limit_per_account(strict_api):
    # Wrong passwords spread over many addresses, each below its own limit: the account's
    # ceiling still closes.
    async with api_client(strict_api) as http:
        owner = await make_user(http)
    statuses = []
    for _ in range(FAILURES_PER_ACCOUNT + 2):
        async with api_client(strict_api) as client:
            statuses.append(await login(client, owner.email, "wrong password!"))
    assert statuses == [401] * FAILURES_PER_ACCOUNT + [429] * 2


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
