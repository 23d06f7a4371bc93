"""The whole instance lifecycle through the real API, a real Celery worker and Postgres,
with a moto server as EC2: create, bootstrap once, heartbeat, stop, start, delete."""

from __future__ import annotations

import base64
import re
import secrets
from collections.abc import Iterator
from typing import Any

import pytest

from tests.support.harness import (
    ec2_client,
    ec2_stack,
    machines_tagged,
    wait_api_state,
)
from tests.support.identity import aws_proof
from tests.support.users import make_user

TOKEN = re.compile(r"cbb_[A-Za-z0-9_-]{20,}")


@pytest.fixture(scope="module")
def api_url(base_env, broker_url, moto_url, tmp_path_factory) -> Iterator[str]:
    state = tmp_path_factory.mktemp("e2e-ec2")
    with ec2_stack(base_env, broker_url, moto_url, state, "e2e-ec2") as url:
        yield url


def user_data_of(ec2: Any, machine_id: str) -> str:
    attr = ec2.describe_instance_attribute(InstanceId=machine_id, Attribute="userData")
    return base64.b64decode(attr["UserData"]["Value"]).decode()


async def test_full_lifecycle_against_moto(client, api_url, moto_url, secret_registry):
    user = await make_user(client)
    me = (await client.get("/api/auth/me", headers=user.headers)).json()
    provider_key = "sk-ant-api03-" + secrets.token_urlsafe(32)
    secret_registry.add(provider_key)
    r = await client.put(
        "/api/user/api-keys/anthropic", json={"key": provider_key}, headers=user.headers
    )
    assert r.status_code in (200, 201), r.text

    r = await client.post(
        "/api/instances", json={"name": "desk", "size": "small"}, headers=user.headers
    )
    assert r.status_code == 202, r.text
    assert r.json()["state"] == "pending"
    instance_id = r.json()["id"]
    await wait_api_state(client, user.headers, instance_id, "running")

    # One machine, tagged at launch, booting with user data that holds no secret but the
    # single-use bootstrap token.
    ec2 = ec2_client(moto_url)
    [machine] = machines_tagged(ec2, instance_id)
    tags = {t["Key"]: t["Value"] for t in machine["Tags"]}
    assert tags["cloudbot:instance-id"] == instance_id
    assert tags["cloudbot:owner-id"] == me["id"]
    assert tags["cloudbot:control-plane"]
    assert machine["InstanceType"] == "t3.small"
    script = user_data_of(ec2, machine["InstanceId"])
    assert provider_key not in script
    assert api_url in script
    [token] = set(TOKEN.findall(script))
    secret_registry.add(token)

    # The token alone, or with the identity document of another machine, gets nothing and
    # stays unspent.
    bearer = {"Authorization": f"Bearer {token}"}
    assert (await client.post("/api/agent/bootstrap", headers=bearer)).status_code == 401
    other = aws_proof("i-0123456789abcdef0")
    r = await client.post("/api/agent/bootstrap", json=other, headers=bearer)
    assert r.status_code == 401
    # With the tagged machine's signed identity document, the token works once:
    # configuration with the provider key, and a credential.
    proof = aws_proof(machine["InstanceId"])
    r = await client.post("/api/agent/bootstrap", json=proof, headers=bearer)
    assert r.status_code == 200, r.text
    boot = r.json()
    secret_registry.add(boot["credential"], boot["agent_token"])
    assert boot["instance_id"] == instance_id
    assert boot["config"]["providers"]["anthropic"]["api_key"] == provider_key
    again = await client.post("/api/agent/bootstrap", json=proof, headers=bearer)
    assert again.status_code == 401

    r = await client.post(
        "/api/agent/heartbeat",
        json={"desktop": True, "agent": True},
        headers={"Authorization": f"Bearer {boot['credential']}"},
    )
    assert r.status_code == 204, r.text
    health = (await client.get(f"/api/instances/{instance_id}", headers=user.headers)).json()
    assert health["health"]["desktop"] is True
    assert health["health"]["agent"] is True

    r = await client.post(f"/api/instances/{instance_id}/stop", headers=user.headers)
    assert r.status_code == 202, r.text
    assert r.json()["state"] == "stopping"
    await wait_api_state(client, user.headers, instance_id, "stopped")
    [machine] = machines_tagged(ec2, instance_id)
    assert machine["State"]["Name"] == "stopped"

    r = await client.post(f"/api/instances/{instance_id}/start", headers=user.headers)
    assert r.status_code == 202, r.text
    await wait_api_state(client, user.headers, instance_id, "running")
    [machine] = machines_tagged(ec2, instance_id)
    assert machine["State"]["Name"] == "running"

    r = await client.delete(f"/api/instances/{instance_id}", headers=user.headers)
    assert r.status_code == 202, r.text
    assert r.json()["state"] == "terminating"
    await wait_api_state(client, user.headers, instance_id, "terminated")
    assert machines_tagged(ec2, instance_id) == []
    [gone] = machines_tagged(ec2, instance_id, include_gone=True)
    assert gone["State"]["Name"] == "terminated"
