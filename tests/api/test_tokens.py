"""Personal access tokens: shown once, stored as a digest, usable as Bearer with their scope,
refused on the account and token routes, and dead at once on every API replica when
revoked or expired."""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import AsyncIterator, Iterator

import asyncpg
import httpx
import pytest

from tests.support.api import ApiServer
from tests.support.clients import api_client
from tests.support.leaks import SECRETS
from tests.support.processes import PYTHON, free_port, http_ok, running
from tests.support.users import User, make_user


async def create_token(
    http: httpx.AsyncClient, user: User, scope: str = "write", **extra: object
) -> dict:
    r = await http.post(
        "/api/user/tokens", json={"name": "ci robot", "scope": scope, **extra}, headers=user.headers
    )
    assert r.status_code == 201, r.text
    assert r.headers["cache-control"] == "no-store"
    body = r.json()
    SECRETS.add(body["token"])
    return body


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture(scope="module")
def second_api(api_server: ApiServer) -> Iterator[str]:
    """Another API replica on the same database and Redis."""
    port = free_port()
    env = {
        **api_server.env,
        "API_PORT": str(port),
        "API_METRICS_PORT": str(free_port()),
        "PUBLIC_API_URL": f"http://127.0.0.1:{port}",
    }
    with running(
        "api-replica",
        [PYTHON, "-m", "cloudbot_api"],
        env,
        ready=http_ok(f"{env['PUBLIC_API_URL']}/healthz"),
    ):
        yield env["PUBLIC_API_URL"]


@pytest.fixture
async def replica(second_api: str) -> AsyncIterator[httpx.AsyncClient]:
    async with api_client(second_api) as client:
        yield client


async def test_a_token_is_shown_once_and_stored_only_as_its_digest(
    http: httpx.AsyncClient, user: User, database_url: str
) -> None:
    created = await create_token(http, user, scope="read")
    token = created["token"]
    assert token.startswith("cbp_")
    assert len(token) > 40
    assert created["hint"] == token[:8] + "..." + token[-4:]

    listed = (await http.get("/api/user/tokens", headers=user.headers)).json()["items"]
    assert [t["id"] for t in listed] == [created["id"]]
    assert token not in str(listed)
    assert "token" not in listed[0]

    conn = await asyncpg.connect(database_url.replace("+asyncpg", ""))
    try:
        row = await conn.fetchrow(
            "SELECT * FROM personal_access_tokens WHERE id = $1", uuid.UUID(created["id"])
        )
    finally:
        await conn.close()
    assert row["token_digest"] == hashlib.sha256(token.encode()).hexdigest()
    assert token not in str(dict(row))


async def test_a_token_lists_machines_and_its_scope_limits_it(
    http: httpx.AsyncClient, user: User
) -> None:
    read = (await create_token(http, user, scope="read"))["token"]
    write = (await create_token(http, user, scope="write"))["token"]

    r = await http.get("/api/instances", headers=bearer(read))
    assert r.status_code == 200, r.text
    assert r.json()["items"] == []

    r = await http.post(
        "/api/user/api-keys",
        json={"provider": "openai", "key": "sk-" + "r" * 30},
        headers=bearer(read),
    )
    assert r.status_code == 403
    assert r.json()["code"] == "insufficient_scope"
    assert (await http.get("/api/user/api-keys", headers=user.headers)).json() == []

    key = "sk-" + uuid.uuid4().hex * 2
    SECRETS.add(key)
    r = await http.post(
        "/api/user/api-keys", json={"provider": "openai", "key": key}, headers=bearer(write)
    )
    assert r.status_code == 201, r.text
    r = await http.get("/api/user/api-keys", headers=bearer(read))
    assert [k["provider"] for k in r.json()] == ["openai"]


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/api/user/tokens"),
        ("POST", "/api/user/tokens"),
        ("DELETE", f"/api/user/tokens/{uuid.uuid4()}"),
        ("GET", "/api/auth/me"),
        ("POST", "/api/auth/logout"),
    ],
)
async def test_a_token_cannot_reach_the_account_or_token_routes(
    http: httpx.AsyncClient, user: User, method: str, path: str
) -> None:
    token = (await create_token(http, user))["token"]
    body = {"name": "minted by a token", "scope": "write"} if method == "POST" else None
    r = await http.request(method, path, json=body, headers=bearer(token))
    assert r.status_code == 403, r.text
    assert r.json()["code"] == "login_required"
    # Nothing was minted: the user still has exactly the one token.
    assert len((await http.get("/api/user/tokens", headers=user.headers)).json()["items"]) == 1


async def test_revocation_is_refused_at_once_on_every_replica(
    http: httpx.AsyncClient, replica: httpx.AsyncClient, user: User
) -> None:
    token = await create_token(http, user)
    assert (await replica.get("/api/instances", headers=bearer(token["token"]))).status_code == 200
    assert (await http.get("/api/instances", headers=bearer(token["token"]))).status_code == 200

    r = await http.delete(f"/api/user/tokens/{token['id']}", headers=user.headers)
    assert r.status_code == 204
    for client in (replica, http):
        r = await client.get("/api/instances", headers=bearer(token["token"]))
        assert r.status_code == 401, r.text
        assert r.headers["content-type"].startswith("application/problem+json")
    assert (await http.get("/api/user/tokens", headers=user.headers)).json()["items"] == []
    r = await http.delete(f"/api/user/tokens/{token['id']}", headers=user.headers)
    assert r.status_code == 404


async def test_an_expired_token_is_refused(
    http: httpx.AsyncClient, user: User, database_url: str
) -> None:
    token = await create_token(http, user, expires_in_days=1)
    assert (await http.get("/api/instances", headers=bearer(token["token"]))).status_code == 200
    conn = await asyncpg.connect(database_url.replace("+asyncpg", ""))
    try:
        await conn.execute(
            "UPDATE personal_access_tokens SET expires_at = now() - interval '1 second' "
            "WHERE id = $1",
            uuid.UUID(token["id"]),
        )
    finally:
        await conn.close()
    assert (await http.get("/api/instances", headers=bearer(token["token"]))).status_code == 401


async def test_one_users_token_cannot_touch_another_users_tokens(
    http: httpx.AsyncClient, user: User
) -> None:
    other = await make_user(http)
    theirs = await create_token(http, other)
    r = await http.delete(f"/api/user/tokens/{theirs['id']}", headers=user.headers)
    assert r.status_code == 404
    assert (await http.get("/api/instances", headers=bearer(theirs["token"]))).status_code == 200


@pytest.mark.parametrize(
    "body",
    [
        {"name": ""},
        {"name": "x" * 65},
        {"name": "ok", "scope": "admin"},
        {"name": "ok", "expires_in_days": 0},
        {"name": "ok", "extra": 1},
    ],
)
async def test_bad_token_requests_get_a_problem(
    http: httpx.AsyncClient, user: User, body: dict
) -> None:
    r = await http.post("/api/user/tokens", json=body, headers=user.headers)
    assert r.status_code == 422
    assert r.headers["content-type"].startswith("application/problem+json")


def test_the_token_format_is_not_a_jwt() -> None:
    # The gateway and the API tell the two apart by prefix; a JWT never starts with cbp_.
    from cloudbot_common.security.access_tokens import PREFIX, mint

    token, digest, hint = mint()
    assert token.startswith(PREFIX)
    assert not token.startswith("eyJ")
    assert digest == hashlib.sha256(token.encode()).hexdigest()
    assert hint.startswith(token[:8])
    assert hint.endswith(token[-4:])
    assert len(hint) <= 16
    assert mint()[0] != token
