"""The provider-key vault over real HTTP, and what actually lands in Postgres."""

from __future__ import annotations

import os
import secrets
import subprocess
import uuid

import pytest
from cryptography.fernet import Fernet
from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import create_async_engine

from cloudbot_common.models import ApiKey
from cloudbot_common.security.vault import Vault, VaultError
from tests.api.test_auth import assert_problem
from tests.conftest import SECRETS, make_user
from tests.support.processes import PYTHON


def fake_key(prefix: str = "sk-ant-") -> str:
    key = prefix + secrets.token_urlsafe(32)
    SECRETS.add(key)
    return key


async def stored_rows(database_url: str, user_email_id: uuid.UUID) -> list[ApiKey]:
    engine = create_async_engine(database_url)
    async with engine.connect() as conn:
        rows = (await conn.execute(select(ApiKey).where(ApiKey.user_id == user_email_id))).all()
    await engine.dispose()
    return rows  # type: ignore[return-value]


async def user_id(http, user) -> uuid.UUID:
    return uuid.UUID((await http.get("/api/auth/me", headers=user.headers)).json()["id"])


async def test_store_list_replace_delete(http, user, database_url, settings):
    key = fake_key()
    r = await http.post(
        "/api/user/api-keys", json={"provider": "anthropic", "key": key}, headers=user.headers
    )
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["provider"] == "anthropic"
    assert body["hint"] == f"sk-…{key[-4:]}"
    assert key not in r.text
    assert key[7:20] not in r.text

    listing = await http.get("/api/user/api-keys", headers=user.headers)
    assert [k["provider"] for k in listing.json()] == ["anthropic"]
    assert key not in listing.text

    # Stored encrypted, bound to this user and provider.
    uid = await user_id(http, user)
    rows = await stored_rows(database_url, uid)
    assert len(rows) == 1
    assert key.encode() not in rows[0].ciphertext
    vault = Vault(settings.encryption_key.get_secret_value())
    assert vault.decrypt(uid, "anthropic", rows[0].ciphertext) == key

    r = await http.post(
        "/api/user/api-keys", json={"provider": "anthropic", "key": key}, headers=user.headers
    )
    assert_problem(r, 409, "api_key_exists")

    newer = fake_key()
    r = await http.put("/api/user/api-keys/anthropic", json={"key": newer}, headers=user.headers)
    assert r.status_code == 200
    assert r.json()["hint"].endswith(newer[-4:])
    rows = await stored_rows(database_url, uid)
    assert vault.decrypt(uid, "anthropic", rows[0].ciphertext) == newer

    # PUT on a provider with no key stores one.
    r = await http.put(
        "/api/user/api-keys/openai", json={"key": fake_key("sk-proj-")}, headers=user.headers
    )
    assert r.status_code == 200
    assert len(await stored_rows(database_url, uid)) == 2

    assert (
        await http.delete("/api/user/api-keys/anthropic", headers=user.headers)
    ).status_code == 204
    r = await http.delete("/api/user/api-keys/anthropic", headers=user.headers)
    assert_problem(r, 404, "api_key_not_found")


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        ({"provider": "not-a-provider", "key": "sk-123456789012"}, "provider"),
        ({"provider": "openai", "key": ""}, "key"),
        ({"provider": "openai", "key": "   "}, "key"),
        ({"provider": "openai", "key": "sk-" + "a" * 600}, "key"),
        ({"provider": "openai", "key": "sk-has space inside"}, "key"),
        ({"provider": "openai"}, "key"),
    ],
)
async def test_bad_keys_are_refused_clearly(http, user, payload, field):
    r = await http.post("/api/user/api-keys", json=payload, headers=user.headers)
    body = assert_problem(r, 422, "validation_failed")
    assert any(field in err["loc"] for err in body["errors"])
    if payload.get("key", "").strip():
        assert payload["key"] not in r.text


async def test_unknown_provider_in_path_is_422(http, user):
    r = await http.put(
        "/api/user/api-keys/nope", json={"key": "sk-123456789012345"}, headers=user.headers
    )
    assert_problem(r, 422, "validation_failed")


async def test_keys_need_a_login_and_are_per_user(http, user):
    assert_problem(await http.get("/api/user/api-keys"), 401, "unauthorized")
    await http.post(
        "/api/user/api-keys",
        json={"provider": "groq", "key": fake_key("gsk_")},
        headers=user.headers,
    )
    other = await make_user(http)
    assert (await http.get("/api/user/api-keys", headers=other.headers)).json() == []
    # Another user's key answers exactly like a missing one.
    r = await http.delete("/api/user/api-keys/groq", headers=other.headers)
    assert_problem(r, 404, "api_key_not_found")
    assert len((await http.get("/api/user/api-keys", headers=user.headers)).json()) == 1


async def test_swapped_ciphertext_fails_to_decrypt(http, database_url, settings):
    alice, bob = await make_user(http), await make_user(http)
    a_key, b_key = fake_key(), fake_key()
    for u, k in ((alice, a_key), (bob, b_key)):
        r = await http.post(
            "/api/user/api-keys", json={"provider": "anthropic", "key": k}, headers=u.headers
        )
        assert r.status_code == 201
    r = await http.post(
        "/api/user/api-keys", json={"provider": "openai", "key": fake_key()}, headers=alice.headers
    )
    a_id, b_id = await user_id(http, alice), await user_id(http, bob)
    vault = Vault(settings.encryption_key.get_secret_value())
    a_rows = {r.provider: r for r in await stored_rows(database_url, a_id)}

    # Copy Alice's ciphertext into Bob's row, as someone with database access might.
    engine = create_async_engine(database_url)
    async with engine.begin() as conn:
        await conn.execute(
            update(ApiKey)
            .where(ApiKey.user_id == b_id, ApiKey.provider == "anthropic")
            .values(ciphertext=a_rows["anthropic"].ciphertext)
        )
    await engine.dispose()
    b_row = (await stored_rows(database_url, b_id))[0]
    with pytest.raises(VaultError):
        vault.decrypt(b_id, "anthropic", b_row.ciphertext)
    # Another provider's row of the same user is refused too.
    with pytest.raises(VaultError):
        vault.decrypt(a_id, "anthropic", a_rows["openai"].ciphertext)
    assert vault.decrypt(a_id, "anthropic", a_rows["anthropic"].ciphertext) == a_key


async def test_key_rotation_command_reencrypts_every_row(http, user, database_url, api_server):
    key = fake_key()
    await http.post(
        "/api/user/api-keys", json={"provider": "mistral", "key": key}, headers=user.headers
    )
    uid = await user_id(http, user)
    old = api_server.env.get("ENCRYPTION_KEY") or os.environ.get("ENCRYPTION_KEY")
    from cloudbot_common.settings import DEV_ENCRYPTION_KEY

    old = old or DEV_ENCRYPTION_KEY
    new = Fernet.generate_key().decode()
    result = subprocess.run(
        [PYTHON, "-m", "cloudbot_api.admin", "rotate-encryption-key"],
        env={**os.environ, **api_server.env, "ENCRYPTION_KEY": f"{new},{old}"},
        capture_output=True,
        text=True,
        check=True,
    )
    assert "re-encrypted" in result.stdout
    assert key not in result.stdout + result.stderr
    row = (await stored_rows(database_url, uid))[0]
    # Only the new key is needed now; the old one alone no longer opens it.
    assert Vault(new).decrypt(uid, "mistral", row.ciphertext) == key
    with pytest.raises(VaultError):
        Vault(old).decrypt(uid, "mistral", row.ciphertext)
