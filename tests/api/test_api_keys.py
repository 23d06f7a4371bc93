"""The provider-key vault through the API in this process, and what actually lands in
Postgres (fast tier)."""

from __future__ import annotations

import uuid

import pytest
from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession

from cloudbot_common.models import ApiKey
from cloudbot_common.security.vault import Vault, VaultError
from tests.support.leaks import fake_key
from tests.support.problems import assert_problem
from tests.support.users import make_user, user_id

pytestmark = pytest.mark.fast


async def stored_rows(db: AsyncSession, owner_id: uuid.UUID) -> list[ApiKey]:
    result = await db.scalars(
        select(ApiKey)
        .where(ApiKey.user_id == owner_id)
        .order_by(ApiKey.provider)
        .execution_options(populate_existing=True)
    )
    return list(result.all())


async def test_store_list_replace_delete(http, user, db, settings):
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
    rows = await stored_rows(db, uid)
    assert len(rows) == 1
    assert key.encode() not in rows[0].ciphertext
    vault = Vault(settings.encryption_key.get_secret_value())
    assert vault.decrypt(uid, "anthropic", rows[0].ciphertext) == key

    r = await http.post(
        "/api/user/api-keys", json={"provider": "anthropic", "key": key}, headers=user.headers
    )
    problem = assert_problem(r, 409, "api_key_exists")
    assert problem["detail"] == "An Anthropic key is already stored; replace it with PUT."

    newer = fake_key()
    r = await http.put("/api/user/api-keys/anthropic", json={"key": newer}, headers=user.headers)
    assert r.status_code == 200
    assert r.json()["hint"].endswith(newer[-4:])
    rows = await stored_rows(db, uid)
    assert vault.decrypt(uid, "anthropic", rows[0].ciphertext) == newer

    # PUT on a provider with no key stores one.
    r = await http.put(
        "/api/user/api-keys/openai", json={"key": fake_key("sk-proj-")}, headers=user.headers
    )
    assert r.status_code == 200
    assert len(await stored_rows(db, uid)) == 2

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


async def test_swapped_ciphertext_fails_to_decrypt(http, db, settings):
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
    a_rows = {r.provider: r for r in await stored_rows(db, a_id)}

    # Copy Alice's ciphertext into Bob's row, as someone with database access might.
    await db.execute(
        update(ApiKey)
        .where(ApiKey.user_id == b_id, ApiKey.provider == "anthropic")
        .values(ciphertext=a_rows["anthropic"].ciphertext)
    )
    b_row = (await stored_rows(db, b_id))[0]
    with pytest.raises(VaultError):
        vault.decrypt(b_id, "anthropic", b_row.ciphertext)
    # Another provider's row of the same user is refused too.
    with pytest.raises(VaultError):
        vault.decrypt(a_id, "anthropic", a_rows["openai"].ciphertext)
    assert vault.decrypt(a_id, "anthropic", a_rows["anthropic"].ciphertext) == a_key
