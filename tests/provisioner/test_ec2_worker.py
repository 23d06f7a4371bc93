"""The provisioner's worker against a moto server as the EC2 endpoint, driven the way the
API drives it: rows and outbox commands in Postgres, ids on the Celery queue."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import update

from cloudbot_common.db import unit_of_work
from cloudbot_common.lifecycle import START, STOP, TERMINATE, lock_instance, transition
from cloudbot_common.models import Instance, OutboxCommand
from cloudbot_common.models import InstanceState as S
from cloudbot_common.security.opaque import token_digest
from cloudbot_common.settings import Settings
from cloudbot_provisioner.instances.steps import VANISHED
from cloudbot_provisioner.reconciler import DRIFTED
from tests.support.harness import (
    TOKEN,
    ec2_client,
    machines_tagged,
    provisioner,
    user_data_of,
)
from tests.support.waiting import eventually

API_URL = "http://control-plane.test:8000"


@pytest.fixture(scope="module")
def worker(ec2_env, tmp_path_factory):
    env = {**ec2_env, "PUBLIC_API_URL": API_URL}
    with provisioner(env, tmp_path_factory.mktemp("ec2-worker"), name="ec2-worker") as proc:
        yield proc


@pytest.fixture
def ec2(moto_url):
    return ec2_client(moto_url)


async def test_full_lifecycle(worker, store, ec2, ec2_env, secret_registry):
    owner = await store.user()
    instance_id, _ = await store.create_instance(owner, "ec2")
    row = await store.wait_state(instance_id, S.RUNNING)

    [machine] = machines_tagged(ec2, str(instance_id))
    assert row.backend_instance_id == machine["InstanceId"]
    assert row.host == machine["PrivateIpAddress"]
    assert (row.vnc_port, row.agent_port) == (7900, 7901)  # the gate, never VNC itself
    tags = {t["Key"]: t["Value"] for t in machine["Tags"]}
    assert tags["cloudbot:instance-id"] == str(instance_id)
    assert tags["cloudbot:owner-id"] == str(owner)
    assert tags["cloudbot:control-plane"] == ec2_env["CONTROL_PLANE_ID"]
    assert machine["InstanceType"] == "t3.small"
    assert machine["ImageId"] == Settings(environment="test").ec2_ami_id
    assert await store.open_commands(instance_id) == 0

    await store.command(instance_id, STOP)
    await store.wait_state(instance_id, S.STOPPED)
    [machine] = machines_tagged(ec2, str(instance_id))
    assert machine["State"]["Name"] == "stopped"

    await store.command(instance_id, START)
    await store.wait_state(instance_id, S.RUNNING)
    [machine] = machines_tagged(ec2, str(instance_id))
    assert machine["State"]["Name"] == "running"

    await store.command(instance_id, TERMINATE)
    row = await store.wait_state(instance_id, S.TERMINATED)
    assert machines_tagged(ec2, str(instance_id)) == []
    assert row.bootstrap_token_hash is None
    assert await store.open_commands(instance_id) == 0
    assert await store.history(instance_id) == [
        "pending",
        "provisioning",
        "running",
        "stopping",
        "stopped",
        "starting",
        "running",
        "terminating",
        "terminated",
    ]


async def test_user_data_carries_only_the_bootstrap_token(
    worker, store, ec2, settings, secret_registry
):
    instance_id, _ = await store.create_instance(await store.user(), "ec2")
    row = await store.wait_state(instance_id, S.RUNNING)
    script = user_data_of(ec2, row.backend_instance_id)

    [token] = set(TOKEN.findall(script))
    secret_registry.add(token)
    assert row.bootstrap_token_hash == token_digest(token)
    assert row.bootstrap_expires_at is not None
    assert API_URL in script
    assert str(instance_id) in script
    for secret in (
        settings.agent_token_secret,
        settings.encryption_key,
        settings.jwt_access_secret,
        settings.jwt_refresh_secret,
    ):
        assert secret.get_secret_value() not in script
    assert "cba_" not in script
    assert "cbc_" not in script
    assert script.startswith("#!/bin/bash")


async def test_duplicate_deliveries_launch_one_machine(worker, store, ec2):
    instance_id, command_id = await store.create_instance(await store.user(), "ec2", publish=False)
    async with store.sessions() as s:
        command = await s.get(OutboxCommand, command_id)
    await asyncio.gather(*(store.publish(command) for _ in range(4)))

    await store.wait_state(instance_id, S.RUNNING)
    assert len(machines_tagged(ec2, str(instance_id), include_gone=True)) == 1
    assert await store.history(instance_id) == ["pending", "provisioning", "running"]


async def test_outbox_relay_publishes_what_was_never_sent(worker, store, ec2):
    # Committed, never published: as if Redis had been down at the API's commit.
    instance_id, command_id = await store.create_instance(await store.user(), "ec2", publish=False)
    await store.wait_state(instance_id, S.RUNNING)
    async with store.sessions() as s:
        command = await s.get(OutboxCommand, command_id)
    assert command.publish_attempts >= 1
    assert command.completed_at is not None


async def test_reconciler_ends_rows_whose_machine_vanished(worker, store, ec2):
    instance_id, _ = await store.create_instance(await store.user(), "ec2")
    row = await store.wait_state(instance_id, S.RUNNING)
    ec2.terminate_instances(InstanceIds=[row.backend_instance_id])

    row = await store.wait_state(instance_id, S.TERMINATED)
    assert row.state_reason == VANISHED


async def test_reconciler_records_a_machine_stopped_outside(worker, store, ec2):
    instance_id, _ = await store.create_instance(await store.user(), "ec2")
    row = await store.wait_state(instance_id, S.RUNNING)
    ec2.stop_instances(InstanceIds=[row.backend_instance_id])

    row = await store.wait_state(instance_id, S.STOPPED)
    assert row.state_reason == DRIFTED


async def test_reconciler_terminates_machines_without_a_live_row(worker, store, ec2, ec2_env):
    def launch(control_plane: str, instance_id: str) -> str:
        tags = [
            {"Key": "cloudbot:control-plane", "Value": control_plane},
            {"Key": "cloudbot:instance-id", "Value": instance_id},
        ]
        r = ec2.run_instances(
            ImageId=Settings(environment="test").ec2_ami_id,
            InstanceType="t3.small",
            MinCount=1,
            MaxCount=1,
            TagSpecifications=[{"ResourceType": "instance", "Tags": tags}],
        )
        return r["Instances"][0]["InstanceId"]

    ours = launch(ec2_env["CONTROL_PLANE_ID"], str(uuid.uuid4()))
    theirs = launch("somebody-else", str(uuid.uuid4()))

    def state(machine_id: str) -> str:
        [r] = ec2.describe_instances(InstanceIds=[machine_id])["Reservations"]
        return r["Instances"][0]["State"]["Name"]

    await eventually(lambda: state(ours) == "terminated", what="orphan terminated")
    assert state(theirs) == "running"
    ec2.terminate_instances(InstanceIds=[theirs])


async def test_reconciler_drives_a_stuck_instance_again(worker, store, ec2):
    instance_id, _ = await store.create_instance(await store.user(), "ec2")
    await store.wait_state(instance_id, S.RUNNING)
    # Stopping for an hour with no command behind it: the command was lost for good.
    async with unit_of_work(store.sessions) as s:
        instance = await lock_instance(s, instance_id)
        assert instance is not None
        await transition(s, instance, S.STOPPING)
        await s.execute(
            update(Instance)
            .where(Instance.id == instance_id)
            .values(state_changed_at=datetime.now(UTC) - timedelta(hours=1))
        )

    await store.wait_state(instance_id, S.STOPPED)
    [machine] = machines_tagged(ec2, str(instance_id))
    assert machine["State"]["Name"] == "stopped"
