"""A worker SIGKILLed between launching a machine and recording it: exactly one machine,
and the instance still converges to running."""

from __future__ import annotations

import asyncio
import signal

import pytest

from cloudbot_common.models import InstanceState as S
from tests.provisioner.harness import Ec2FaultProxy, ec2_client, machines_tagged, provisioner


@pytest.fixture
def proxy(moto_url):
    with Ec2FaultProxy(moto_url) as p:
        yield p


async def test_worker_killed_mid_launch_leaves_one_machine(db, ec2_env, proxy, moto_url, tmp_path):
    env = {**ec2_env, "AWS_ENDPOINT_URL": proxy.url}
    # moto launches the machine, but its answer never reaches the worker, which dies.
    release = proxy.hold("RunInstances")
    owner = await db.user()
    with provisioner(env, tmp_path, name="doomed-worker") as doomed:
        instance_id, _ = await db.create_instance(owner, "ec2")
        assert await asyncio.to_thread(proxy.held.wait, 30)
        doomed.kill(signal.SIGKILL)
        doomed.popen.wait(10)
    release.set()
    ec2 = ec2_client(moto_url)
    assert len(machines_tagged(ec2, str(instance_id))) == 1
    assert (await db.instance(instance_id)).state == S.PROVISIONING

    # A new worker gets the command again (the relay republishes it) and adopts the
    # machine it finds by its tag instead of launching a second one.
    with provisioner(env, tmp_path, name="next-worker"):
        row = await db.wait_state(instance_id, S.RUNNING)
    [machine] = machines_tagged(ec2, str(instance_id))
    assert row.backend_instance_id == machine["InstanceId"]
    assert proxy.calls["RunInstances"] == 1
