"""The audit log: every security-relevant action on one's account, with time, actor,
address, user agent and request id, paginated; nothing of another user's; no secret."""

from __future__ import annotations

import uuid

import httpx
import pytest

from tests.support.clients import fake_client_address
from tests.support.leaks import SECRETS
from tests.support.users import make_user

pytestmark = pytest.mark.fast


async def audit(http: httpx.AsyncClient, headers: dict[str, str], **params: int) -> dict:
    r = await http.get("/api/user/audit", headers=headers, params=params)
    assert r.status_code == 200, r.text
    return r.json()


async def test_the_account_s_actions_are_audited_with_their_origin(
    http: httpx.AsyncClient,
) -> None:
    user = await make_user(http)
    other = await make_user(http)
    address = fake_client_address()
    agent = f"audit-test/{uuid.uuid4().hex[:8]}"
    origin = {"X-Forwarded-For": address, "User-Agent": agent}

    r = await http.post(
        "/api/auth/login",
        json={"email": user.email, "password": "wrong password " + uuid.uuid4().hex},
        headers=origin,
    )
    assert r.status_code == 401
    key = "sk-ant-" + uuid.uuid4().hex * 2
    SECRETS.add(key)
    headers = {**user.headers, **origin, "X-Request-ID": "audit-request-1"}
    r = await http.post(
        "/api/user/api-keys", json={"provider": "anthropic", "key": key}, headers=headers
    )
    assert r.status_code == 201, r.text
    r = await http.put("/api/user/api-keys/anthropic", json={"key": key + "x"}, headers=headers)
    assert r.status_code == 200, r.text
    r = await http.delete("/api/user/api-keys/anthropic", headers=headers)
    assert r.status_code == 204
    r = await http.post("/api/user/tokens", json={"name": "robot"}, headers=headers)
    assert r.status_code == 201
    token = r.json()
    SECRETS.add(token["token"])
    r = await http.delete(f"/api/user/tokens/{token['id']}", headers=headers)
    assert r.status_code == 204

    events = (await audit(http, user.headers, limit=200))["items"]
    actions = [e["action"] for e in reversed(events)]
    assert actions == [
        "auth.signup",
        "auth.login",
        "auth.login_failed",
        "api_key.added",
        "api_key.replaced",
        "api_key.removed",
        "token.created",
        "token.revoked",
    ]
    by_action = {e["action"]: e for e in events}
    failed = by_action["auth.login_failed"]
    assert failed["actor"] == "anonymous"
    assert failed["address"] == address
    assert failed["user_agent"] == agent
    added = by_action["api_key.added"]
    assert added["target"] == "api_key:anthropic"
    assert added["request_id"] == "audit-request-1"
    assert added["actor"].startswith("session:")
    assert by_action["token.created"]["details"] == {"name": "robot", "scope": "write"}
    assert by_action["token.revoked"]["target"] == f"token:{token['id']}"

    text = str(events)
    for secret in (key, user.password, user.access_token, token["token"]):
        assert secret not in text

    # Another user sees only their own account.
    theirs = [e["action"] for e in (await audit(http, other.headers))["items"]]
    assert theirs == ["auth.login", "auth.signup"]


async def test_logout_and_refresh_reuse_are_audited(http: httpx.AsyncClient) -> None:
    user = await make_user(http)
    r = await http.post("/api/auth/refresh", json={"refresh_token": user.refresh_token})
    assert r.status_code == 200
    second = r.json()
    SECRETS.add(second["access_token"], second["refresh_token"])
    r = await http.post("/api/auth/refresh", json={"refresh_token": user.refresh_token})
    assert r.status_code == 401
    assert r.json()["code"] == "refresh_token_reused"

    again = await make_user_login(http, user.email, user.password)
    r = await http.post("/api/auth/logout", headers=again)
    assert r.status_code == 204
    # Read with a fresh login: the logout ended the one above.
    live = await make_user_login(http, user.email, user.password)
    actions = [e["action"] for e in reversed((await audit(http, live))["items"])]
    assert actions == [
        "auth.signup",
        "auth.login",
        "auth.refresh_reused",
        "auth.login",
        "auth.logout",
        "auth.login",
    ]


async def make_user_login(http: httpx.AsyncClient, email: str, password: str) -> dict[str, str]:
    r = await http.post("/api/auth/login", json={"email": email, "password": password})
    assert r.status_code == 200, r.text
    tokens = r.json()
    SECRETS.add(tokens["access_token"], tokens["refresh_token"])
    return {"Authorization": f"Bearer {tokens['access_token']}"}


async def test_the_audit_log_pages_newest_first(http: httpx.AsyncClient) -> None:
    user = await make_user(http)
    for provider in ("openai", "groq", "mistral"):
        key = "sk-" + uuid.uuid4().hex * 2
        SECRETS.add(key)
        r = await http.post(
            "/api/user/api-keys", json={"provider": provider, "key": key}, headers=user.headers
        )
        assert r.status_code == 201
    everything = (await audit(http, user.headers))["items"]
    assert len(everything) == 5
    ids = [e["id"] for e in everything]
    assert ids == sorted(ids, reverse=True)

    pages, before = [], None
    while True:
        params = {"limit": 2} | ({"before": before} if before else {})
        page = await audit(http, user.headers, **params)
        pages.append([e["id"] for e in page["items"]])
        before = page["next_before"]
        if before is None:
            break
    assert pages == [ids[0:2], ids[2:4], ids[4:5]]

    r = await http.get("/api/user/audit", params={"limit": 0}, headers=user.headers)
    assert r.status_code == 422
    # Ids are bigints: the largest is a valid (empty) page, one past it a 422, not a 500.
    assert (await audit(http, user.headers, before=2**63 - 1))["items"] == everything
    for cursor in (2**63, 10**32):
        r = await http.get("/api/user/audit", params={"before": cursor}, headers=user.headers)
        assert r.status_code == 422, r.text
        assert r.json()["code"] == "validation_failed"
        r = await http.get(
            f"/api/user/webhooks/{uuid.uuid4()}/deliveries",
            params={"before": cursor},
            headers=user.headers,
        )
        assert r.status_code == 422, r.text
    r = await http.get("/api/user/audit")
    assert r.status_code == 401
