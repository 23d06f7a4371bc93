"""The instance API on its own (no worker running), in this process: states, guards,
quota, idempotency, ownership, the outbox and the instance-facing endpoints (fast tier)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from cloudbot_common.lifecycle import PROVISION, START, STOP, TERMINATE
from cloudbot_common.models import Instance, InstanceState, OutboxCommand
from cloudbot_common.security.opaque import token_digest
from tests.support.instances import create, give_bootstrap_token, machine_proof, move
from tests.support.leaks import SECRETS
from tests.support.problems import assert_problem
from tests.support.users import make_user

pytestmark = pytest.mark.fast


async def commands_of(db: AsyncSession, instance_id: str) -> list[str]:
    """The tasks staged in the outbox for an instance, sorted by name."""
    tasks = await db.scalars(
        select(OutboxCommand.task).where(OutboxCommand.instance_id == uuid.UUID(instance_id))
    )
    return sorted(tasks.all())


async def test_create_answers_202_pending_and_writes_the_outbox(http, user, db):
    r = await create(http, user, name="My desk 1")
    assert r.status_code == 202, r.text
    body = r.json()
    assert body["state"] == "pending"
    assert body["name"] == "My desk 1"
    assert body["health"] == {"desktop": None, "agent": None, "last_heartbeat_at": None}
    assert r.headers["location"] == f"/api/instances/{body['id']}"
    assert (await http.get(r.headers["location"], headers=user.headers)).json()["id"] == body["id"]
    listing = (await http.get("/api/instances", headers=user.headers)).json()["items"]
    assert [i["id"] for i in listing] == [body["id"]]

    rows = (
        await db.scalars(
            select(OutboxCommand).where(OutboxCommand.instance_id == uuid.UUID(body["id"]))
        )
    ).all()
    instance = await db.get(Instance, uuid.UUID(body["id"]))
    assert [row.task for row in rows] == [PROVISION.task]
    assert rows[0].request_id == r.headers["x-request-id"]
    # Published once the request committed (to this process's in-memory broker).
    assert rows[0].published_at is not None
    assert instance is not None
    assert instance.instance_type == "t3.small"


@pytest.mark.parametrize(
    ("payload", "status", "code"),
    [
        ({"name": "desk", "size": "t3.2xlarge"}, 422, "unknown_size"),
        ({"name": "desk", "size": "huge"}, 422, "unknown_size"),
        ({"name": "", "size": "small"}, 422, "validation_failed"),
        ({"name": "x" * 65, "size": "small"}, 422, "validation_failed"),
        ({"name": "<script>", "size": "small"}, 422, "validation_failed"),
        (
            {"name": "desk", "size": "small", "instance_type": "p5.48xlarge"},
            422,
            "validation_failed",
        ),
    ],
)
async def test_create_validates_name_and_size(http, user, db, payload, status, code):
    r = await http.post("/api/instances", json=payload, headers=user.headers)
    assert_problem(r, status, code)
    assert (await http.get("/api/instances", headers=user.headers)).json()["items"] == []
    assert await db.scalar(select(func.count()).select_from(OutboxCommand)) == 0


async def test_idempotency_key_returns_the_first_answer(http, user, db):
    key = str(uuid.uuid4())
    first = await create(http, user, **{"Idempotency-Key": key})
    again = await create(http, user, **{"Idempotency-Key": key})
    assert first.status_code == again.status_code == 202
    assert first.json() == again.json()
    other = await create(http, user, name="other", **{"Idempotency-Key": "k2"})
    assert other.json()["id"] != first.json()["id"]
    items = (await http.get("/api/instances", headers=user.headers)).json()["items"]
    assert len(items) == 2
    reused = await create(http, user, name="different", **{"Idempotency-Key": key})
    assert_problem(reused, 409, "idempotency_key_reused")
    count = await db.scalar(
        select(func.count())
        .select_from(Instance)
        .where(Instance.id.in_([uuid.UUID(i["id"]) for i in items]))
    )
    assert count == 2
    assert await commands_of(db, first.json()["id"]) == [PROVISION.task]


async def test_live_instance_quota(http, user):
    for i in range(3):
        assert (await create(http, user, name=f"d{i}")).status_code == 202
    r = await create(http, user, name="d3")
    assert_problem(r, 403, "instance_quota_exceeded")
    # A machine being deleted no longer counts against the quota.
    first = (await http.get("/api/instances", headers=user.headers)).json()["items"][0]
    assert (
        await http.delete(f"/api/instances/{first['id']}", headers=user.headers)
    ).status_code == 202
    assert (await create(http, user, name="d4")).status_code == 202


async def test_state_guards_answer_409_with_the_state(http, user, db, db_connection, redis):
    iid = (await create(http, user)).json()["id"]
    for action in ("stop", "start"):
        r = await http.post(f"/api/instances/{iid}/{action}", headers=user.headers)
        body = assert_problem(r, 409, "instance_state_conflict")
        assert body["state"] == "pending"

    await move(db_connection, redis, iid, InstanceState.PROVISIONING, InstanceState.RUNNING)
    assert_problem(
        await http.post(f"/api/instances/{iid}/start", headers=user.headers),
        409,
        "instance_state_conflict",
    )
    r = await http.post(f"/api/instances/{iid}/stop", headers=user.headers)
    assert r.status_code == 202
    assert r.json()["state"] == "stopping"
    assert await commands_of(db, iid) == sorted(c.task for c in (PROVISION, STOP))
    assert_problem(
        await http.post(f"/api/instances/{iid}/stop", headers=user.headers),
        409,
        "instance_state_conflict",
    )
    await move(db_connection, redis, iid, InstanceState.STOPPED)
    r = await http.post(f"/api/instances/{iid}/start", headers=user.headers)
    assert r.json()["state"] == "starting"
    assert await commands_of(db, iid) == sorted(c.task for c in (PROVISION, STOP, START))
    r = await http.delete(f"/api/instances/{iid}", headers=user.headers)
    assert r.status_code == 202
    assert r.json()["state"] == "terminating"
    body = assert_problem(
        await http.delete(f"/api/instances/{iid}", headers=user.headers),
        409,
        "instance_state_conflict",
    )
    assert body["state"] == "terminating"
    # Each accepted request staged its one command; each refused one staged nothing.
    assert await commands_of(db, iid) == sorted(c.task for c in (PROVISION, STOP, START, TERMINATE))


async def test_another_users_instance_is_not_found_everywhere(http, user, db_connection, redis):
    iid = (await create(http, user)).json()["id"]
    await move(db_connection, redis, iid, InstanceState.PROVISIONING, InstanceState.RUNNING)
    other = await make_user(http)
    h = other.headers
    missing = str(uuid.uuid4())
    for target in (iid, missing):
        for method, path, body in [
            ("GET", "", None),
            ("DELETE", "", None),
            ("POST", "/stop", None),
            ("POST", "/start", None),
            ("POST", "/tickets", {"channel": "vnc"}),
            ("GET", "/events", None),
        ]:
            r = await http.request(method, f"/api/instances/{target}{path}", headers=h, json=body)
            problem = assert_problem(r, 404, "instance_not_found")
            assert problem["detail"] == "No such instance."
    assert (await http.get("/api/instances", headers=h)).json()["items"] == []
    # The owner's instance is untouched.
    assert (await http.get(f"/api/instances/{iid}", headers=user.headers)).json()[
        "state"
    ] == "running"


async def test_tickets_only_for_running_instances(http, user, db_connection, redis):
    iid = (await create(http, user)).json()["id"]
    r = await http.post(
        f"/api/instances/{iid}/tickets", json={"channel": "vnc"}, headers=user.headers
    )
    assert_problem(r, 409, "instance_state_conflict")
    await move(db_connection, redis, iid, InstanceState.PROVISIONING, InstanceState.RUNNING)
    r = await http.post(
        f"/api/instances/{iid}/tickets", json={"channel": "cloudbot"}, headers=user.headers
    )
    assert r.status_code == 201
    ticket = r.json()
    SECRETS.add(ticket["ticket"])
    assert ticket["url"].endswith(f"/api/instances/{iid}/cloudbot?ticket={ticket['ticket']}")
    assert 0 < await redis.ttl(f"cloudbot:ticket:{token_digest(ticket['ticket'])}") <= 30
    r = await http.post(
        f"/api/instances/{iid}/tickets", json={"channel": "ssh"}, headers=user.headers
    )
    assert_problem(r, 422, "validation_failed")


async def test_bootstrap_token_works_once_and_heartbeats_show_health(
    http, user, db, db_connection, redis
):
    key = "sk-ant-" + uuid.uuid4().hex * 2
    SECRETS.add(key)
    await http.post(
        "/api/user/api-keys", json={"provider": "anthropic", "key": key}, headers=user.headers
    )
    iid = (await create(http, user)).json()["id"]
    await move(db_connection, redis, iid, InstanceState.PROVISIONING)
    token = await give_bootstrap_token(db_connection, iid)
    proof = await machine_proof(db_connection, iid)

    bearer = {"Authorization": f"Bearer {token}"}
    r = await http.post("/api/agent/bootstrap", json=proof, headers=bearer)
    assert r.status_code == 200, r.text
    boot = r.json()
    SECRETS.add(boot["credential"], boot["agent_token"])
    assert boot["instance_id"] == iid
    assert boot["config"]["providers"]["anthropic"] == {"api_key": key, "env": "ANTHROPIC_API_KEY"}
    assert boot["config"]["agent"]["auth_token"] == boot["agent_token"]
    assert boot["credential"].startswith("cbc_")

    again = await http.post("/api/agent/bootstrap", json=proof, headers=bearer)
    assert_problem(again, 401, "invalid_bootstrap_token")

    hb = {"Authorization": f"Bearer {boot['credential']}"}
    r = await http.post("/api/agent/heartbeat", json={"desktop": True, "agent": False}, headers=hb)
    assert r.status_code == 204
    health = (await http.get(f"/api/instances/{iid}", headers=user.headers)).json()["health"]
    assert health["desktop"] is True
    assert health["agent"] is False
    assert health["last_heartbeat_at"] is not None

    # A machine that stopped reporting has unknown health, not its last "up".
    row = await db.get(Instance, uuid.UUID(iid), populate_existing=True)
    assert row is not None
    row.last_heartbeat_at = datetime.now(UTC) - timedelta(seconds=121)
    await db.flush()
    health = (await http.get(f"/api/instances/{iid}", headers=user.headers)).json()["health"]
    assert health["desktop"] is None
    assert health["agent"] is None
    assert health["last_heartbeat_at"] is not None
    # A user's access token is not an instance credential.
    r = await http.post(
        "/api/agent/heartbeat", json={"desktop": True, "agent": True}, headers=user.headers
    )
    assert_problem(r, 401, "invalid_instance_credential")


async def test_expired_bootstrap_token_is_refused(http, user, db_connection):
    iid = (await create(http, user)).json()["id"]
    token = await give_bootstrap_token(db_connection, iid, ttl=-1)
    proof = await machine_proof(db_connection, iid)
    r = await http.post(
        "/api/agent/bootstrap", json=proof, headers={"Authorization": f"Bearer {token}"}
    )
    assert_problem(r, 401, "invalid_bootstrap_token")
