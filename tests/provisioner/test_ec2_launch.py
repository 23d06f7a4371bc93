"""What a launch asks EC2 for, read back from the moto server (the real wire format): a
private machine (no public address even in a subnet that hands them out), an encrypted
disk, IMDSv2 only, inside the configured subnet and security group; and no launch at all
without them."""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from cloudbot_common.settings import Settings
from cloudbot_provisioner.backends.base import LaunchSpec
from cloudbot_provisioner.backends.ec2 import Ec2Backend
from cloudbot_provisioner.errors import PermanentError
from tests.support.harness import AWS_ENV, ec2_client, machines_tagged, moto_network


def _settings(moto_url: str, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "local_dev_mode": False,
        "aws_endpoint_url": moto_url,
        "aws_region": AWS_ENV["AWS_REGION"],
        "aws_access_key_id": AWS_ENV["AWS_ACCESS_KEY_ID"],
        "aws_secret_access_key": AWS_ENV["AWS_SECRET_ACCESS_KEY"],
        "ec2_subnet_id": moto_network(moto_url)["EC2_SUBNET_ID"],
        "ec2_security_group_ids": moto_network(moto_url)["EC2_SECURITY_GROUP_IDS"],
    }
    return Settings(_env_file=None, **(values | overrides))


def _spec() -> LaunchSpec:
    return LaunchSpec(uuid.uuid4(), uuid.uuid4(), "launch-test", "t3.small", "cbb_" + "x" * 40)


async def test_a_machine_is_private_encrypted_and_imdsv2_only(moto_url: str) -> None:
    settings = _settings(moto_url)
    backend = await Ec2Backend.open(settings)
    spec = _spec()
    try:
        await backend.launch(spec)
    finally:
        await backend.aclose()

    ec2 = ec2_client(moto_url)
    [machine] = machines_tagged(ec2, str(spec.instance_id))
    # The subnet maps public addresses on launch; the launch refuses one.
    assert ec2.describe_subnets(SubnetIds=[settings.ec2_subnet_id])["Subnets"][0][
        "MapPublicIpOnLaunch"
    ]
    assert machine.get("PublicIpAddress") is None
    [interface] = machine["NetworkInterfaces"]
    assert not interface.get("Association")
    assert machine["SubnetId"] == settings.ec2_subnet_id
    assert [g["GroupId"] for g in interface["Groups"]] == settings.ec2_security_group_ids
    assert machine["MetadataOptions"]["HttpTokens"] == "required"
    [root] = machine["BlockDeviceMappings"]
    assert root["DeviceName"] == settings.ec2_root_device_name
    [volume] = ec2.describe_volumes(VolumeIds=[root["Ebs"]["VolumeId"]])["Volumes"]
    assert volume["Encrypted"] is True
    assert volume["Size"] == settings.ec2_root_volume_gib


@pytest.mark.parametrize("missing", ["ec2_subnet_id", "ec2_security_group_ids"])
async def test_no_launch_without_a_subnet_and_security_group(moto_url: str, missing: str) -> None:
    # Left out, EC2 would pick the default VPC: a public subnet and its default group.
    backend = await Ec2Backend.open(
        _settings(moto_url, **{missing: None if "subnet" in missing else ""})
    )
    spec = _spec()
    try:
        with pytest.raises(PermanentError, match="EC2_SUBNET_ID and EC2_SECURITY_GROUP_IDS"):
            await backend.launch(spec)
    finally:
        await backend.aclose()
    assert machines_tagged(ec2_client(moto_url), str(spec.instance_id), include_gone=True) == []
