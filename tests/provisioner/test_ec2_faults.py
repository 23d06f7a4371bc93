"""Faults between the provisioner and EC2: throttling, no capacity, and requests EC2
refuses for good. A proxy in front of moto injects them."""

from __future__ import annotations

import pytest

from cloudbot_common.models import InstanceState as S
from tests.provisioner.harness import Ec2FaultProxy, ec2_client, machines_tagged, provisioner


@pytest.fixture(scope="module")
def proxy(moto_url):
    with Ec2FaultProxy(moto_url) as p:
        yield p


@pytest.fixture(autouse=True)
def _healthy_proxy(proxy):
    proxy.reset()


@pytest.fixture(scope="module")
def env(ec2_env, proxy):
    return {**ec2_env, "AWS_ENDPOINT_URL": proxy.url}


@pytest.fixture(scope="module")
def worker(env, tmp_path_factory):
    with provisioner(env, tmp_path_factory.mktemp("faults"), name="faults-worker") as proc:
        yield proc


@pytest.mark.parametrize(
    ("code", "status", "words"),
    [
        ("RequestLimitExceeded", 503, "throttling"),
        ("InsufficientInstanceCapacity", 500, "no capacity"),
    ],
)
async def test_transient_errors_are_retried_then_fail_with_a_reason(
    worker, db, proxy, moto_url, code, status, words
):
    proxy.fail("RunInstances", code, status)
    instance_id, _ = await db.create_instance(await db.user(), "ec2")
    row = await db.wait_state(instance_id, S.FAILED, timeout=60)
    assert words in row.state_reason
    assert code in row.state_reason
    assert "Gave up after 3 attempts" in row.state_reason  # TASK_MAX_RETRIES=2
    assert proxy.calls["RunInstances"] >= 3
    assert machines_tagged(ec2_client(moto_url), str(instance_id)) == []
    assert await db.open_commands(instance_id) == 0
    assert await db.history(instance_id) == ["pending", "provisioning", "failed"]


async def test_a_transient_error_that_heals_is_ridden_out(worker, db, proxy, moto_url):
    proxy.fail("RunInstances", "InsufficientInstanceCapacity", 500, times=3)
    instance_id, _ = await db.create_instance(await db.user(), "ec2")
    await db.wait_state(instance_id, S.RUNNING, timeout=60)
    assert proxy.calls["RunInstances"] == 4
    assert len(machines_tagged(ec2_client(moto_url), str(instance_id))) == 1


async def test_errors_that_will_not_heal_fail_at_once(worker, db, proxy):
    proxy.fail("RunInstances", "InvalidAMIID.NotFound", 400)
    instance_id, _ = await db.create_instance(await db.user(), "ec2")
    row = await db.wait_state(instance_id, S.FAILED)
    assert "InvalidAMIID.NotFound" in row.state_reason
    assert proxy.calls["RunInstances"] == 1
