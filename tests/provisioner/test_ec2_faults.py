"""Faults between the provisioner and EC2, injected by a proxy in front of moto: errors
that heal are ridden out, errors that will not heal fail at once. (Retries running out,
and a worker killed mid-launch, are covered through the whole stack in
tests/e2e/test_lifecycle_faults.py.)"""

from __future__ import annotations

import pytest

from cloudbot_common.models import InstanceState as S
from tests.support.harness import Ec2FaultProxy, ec2_client, machines_tagged, provisioner


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


async def test_a_transient_error_that_heals_is_ridden_out(worker, store, proxy, moto_url):
    proxy.fail("RunInstances", "InsufficientInstanceCapacity", 500, times=3)
    instance_id, _ = await store.create_instance(await store.user(), "ec2")
    await store.wait_state(instance_id, S.RUNNING, timeout=60)
    assert proxy.calls["RunInstances"] == 4
    assert len(machines_tagged(ec2_client(moto_url), str(instance_id), include_gone=True)) == 1


async def test_errors_that_will_not_heal_fail_at_once(worker, store, proxy):
    proxy.fail("RunInstances", "InvalidAMIID.NotFound", 400)
    instance_id, _ = await store.create_instance(await store.user(), "ec2")
    row = await store.wait_state(instance_id, S.FAILED)
    assert "InvalidAMIID.NotFound" in row.state_reason
    assert proxy.calls["RunInstances"] == 1
