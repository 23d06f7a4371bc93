"""Requests racing each other through the API process: each gets its own connection and
transaction, so the row locks and unique indexes are what decides."""

from __future__ import annotations

import asyncio

from tests.support.instances import create
from tests.support.leaks import SECRETS


async def test_concurrent_refresh_with_one_token_yields_one_winner(http, user):
    results = await asyncio.gather(
        *[
            http.post("/api/auth/refresh", json={"refresh_token": user.refresh_token})
            for _ in range(3)
        ]
    )
    codes = sorted(r.status_code for r in results)
    for r in results:
        if r.status_code == 200:
            SECRETS.add(r.json()["access_token"], r.json()["refresh_token"])
    assert codes == [200, 401, 401]


async def test_concurrent_creates_with_one_idempotency_key_make_one_instance(http, user):
    concurrent = await asyncio.gather(
        *[create(http, user, name="other", **{"Idempotency-Key": "k2"}) for _ in range(3)]
    )
    assert [r.status_code for r in concurrent] == [202] * 3
    assert len({r.json()["id"] for r in concurrent}) == 1
    items = (await http.get("/api/instances", headers=user.headers)).json()["items"]
    assert [i["id"] for i in items] == [concurrent[0].json()["id"]]


async def test_concurrent_creates_of_one_user_keep_the_quota_without_deadlock(http, user):
    """Creates of one user at once, each with its own Idempotency-Key: the quota admits
    exactly three; none fails (two of them used to deadlock on the user's row)."""
    answers = await asyncio.gather(
        *[create(http, user, name=f"c{i}", **{"Idempotency-Key": f"c{i}"}) for i in range(8)]
    )
    assert sorted(r.status_code for r in answers) == [202] * 3 + [403] * 5, [
        r.text for r in answers
    ]
