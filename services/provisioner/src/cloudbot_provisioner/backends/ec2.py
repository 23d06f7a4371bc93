"""Machines on EC2, through aiobotocore.

Each machine is tagged at launch with its instance id, owner and this control plane's id;
the tags are how a machine is found again after a crash and how the reconciler tells ours
from anybody else's.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from datetime import UTC, datetime
from typing import Any

import aiohttp
from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    NoCredentialsError,
    ParamValidationError,
)

from cloudbot_common import instance_contract as contract
from cloudbot_common.security.opaque import token_digest
from cloudbot_common.settings import Settings
from cloudbot_provisioner.backends.base import LaunchSpec, Machine, MachineState
from cloudbot_provisioner.backends.user_data import render_user_data
from cloudbot_provisioner.errors import PermanentError, TransientError

TAG_INSTANCE_ID = "cloudbot:instance-id"
TAG_OWNER_ID = "cloudbot:owner-id"
TAG_CONTROL_PLANE = "cloudbot:control-plane"

_STATES = {
    "pending": MachineState.PENDING,
    "running": MachineState.RUNNING,
    "stopping": MachineState.STOPPING,
    "stopped": MachineState.STOPPED,
    "shutting-down": MachineState.GONE,
    "terminated": MachineState.GONE,
}
_NOT_GONE = ["pending", "running", "stopping", "stopped"]

_THROTTLED = {"RequestLimitExceeded", "Throttling", "ThrottlingException", "RequestThrottled"}
_NO_CAPACITY = {
    "InsufficientInstanceCapacity",
    "InsufficientHostCapacity",
    "InsufficientCapacity",
    "InsufficientReservedInstanceCapacity",
}
# The machine is between states (a stop on a pending machine, say); it settles by itself.
_SETTLING = {"IncorrectInstanceState", "IncorrectState", "InvalidInstanceID.NotFound"}
_SERVER_SIDE = {"InternalError", "InternalFailure", "ServiceUnavailable", "Unavailable"}


def client_token(spec: LaunchSpec) -> str:
    """The launch's idempotency token: the instance id, plus a fingerprint of its bootstrap
    token.

    Retries of one launch (botocore's own, or a lost response) send identical parameters
    and get the same machine back. So does a relaunch after a crash that the tag lookup
    could not see the first machine for: it carries the same bootstrap token (see
    `_launch`). A launch with a new token (the old one near its expiry) is a new request.
    """
    fingerprint = token_digest(spec.bootstrap_token)[:12]
    return f"cb-{spec.instance_id.hex}-{fingerprint}"


def _describe_error(error: ClientError, doing: str) -> TransientError | PermanentError:
    err = error.response.get("Error", {})
    code = str(err.get("Code", "Unknown"))
    message = str(err.get("Message", "")).strip()
    status = int(error.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
    if code in _THROTTLED:
        return TransientError(f"Could not {doing}: EC2 is throttling requests ({code}).")
    if code in _NO_CAPACITY:
        return TransientError(
            f"Could not {doing}: EC2 has no capacity for this instance type right now ({code})."
        )
    if code in _SETTLING:
        return TransientError(f"Could not {doing} yet: the machine is changing state ({code}).")
    if code in _SERVER_SIDE or status >= 500:
        return TransientError(f"Could not {doing}: EC2 had a server error ({code}, {status}).")
    detail = f": {message}" if message else ""
    return PermanentError(f"Could not {doing}: EC2 refused the request ({code}{detail}).")


@asynccontextmanager
async def _calling_ec2(doing: str, *, missing_ok: bool = False) -> AsyncIterator[None]:
    """Turns what botocore and aiohttp raise into transient or permanent errors.

    With `missing_ok`, "no such instance" ends the block quietly instead.
    """
    try:
        yield
    except ClientError as e:
        if missing_ok and e.response.get("Error", {}).get("Code") == "InvalidInstanceID.NotFound":
            return
        raise _describe_error(e, doing) from e
    except (NoCredentialsError, ParamValidationError) as e:
        raise PermanentError(f"Could not {doing}: {e}") from e
    except (BotoCoreError, aiohttp.ClientError, TimeoutError, OSError) as e:
        raise TransientError(f"Could not {doing}: EC2 did not answer ({type(e).__name__}).") from e


def _tags(instance: dict[str, Any]) -> dict[str, str]:
    return {t["Key"]: t["Value"] for t in instance.get("Tags", [])}


def _machine(instance: dict[str, Any]) -> Machine:
    return Machine(
        id=instance["InstanceId"],
        state=_STATES.get(instance["State"]["Name"], MachineState.PENDING),
        instance_id=_tags(instance).get(TAG_INSTANCE_ID),
        host=instance.get("PrivateIpAddress"),
        # The gateway connects to the machine's gate, never to the services behind it.
        vnc_port=contract.GATE_VNC_PORT,
        agent_port=contract.GATE_AGENT_PORT,
        launched_at=instance.get("LaunchTime"),
    )


class Ec2Backend:
    def __init__(self, client: Any, settings: Settings, exit_stack: AsyncExitStack) -> None:
        self._ec2 = client
        self._settings = settings
        self._exit_stack = exit_stack

    @property
    def name(self) -> str:
        return "ec2"

    @classmethod
    async def open(cls, settings: Settings) -> Ec2Backend:
        """One client (and connection pool) for the life of the worker process."""
        stack = AsyncExitStack()
        key = settings.aws_access_key_id
        secret = settings.aws_secret_access_key
        client = await stack.enter_async_context(
            get_session().create_client(
                "ec2",
                region_name=settings.aws_region,
                endpoint_url=settings.aws_endpoint_url,
                aws_access_key_id=key.get_secret_value() if key else None,
                aws_secret_access_key=secret.get_secret_value() if secret else None,
                # One quick retry in botocore; the task layer owns the longer backoff.
                config=AioConfig(
                    retries={"mode": "standard", "max_attempts": 2},
                    connect_timeout=5,
                    read_timeout=30,
                ),
            )
        )
        return cls(client, settings, stack)

    async def aclose(self) -> None:
        await self._exit_stack.aclose()

    async def _describe(self, doing: str, **kwargs: Any) -> list[Machine]:
        machines: list[Machine] = []
        async with _calling_ec2(doing):
            paginator = self._ec2.get_paginator("describe_instances")
            async for page in paginator.paginate(**kwargs):
                for reservation in page.get("Reservations", []):
                    machines.extend(_machine(i) for i in reservation.get("Instances", []))
        return machines

    async def find(self, instance_id: uuid.UUID) -> list[Machine]:
        machines = await self._describe(
            "look for the machine",
            Filters=[
                {"Name": f"tag:{TAG_INSTANCE_ID}", "Values": [str(instance_id)]},
                {"Name": f"tag:{TAG_CONTROL_PLANE}", "Values": [self._settings.control_plane_id]},
                {"Name": "instance-state-name", "Values": _NOT_GONE},
            ],
        )
        never = datetime.max.replace(tzinfo=UTC)
        return sorted(machines, key=lambda m: (m.launched_at or never, m.id))

    async def describe(self, machine_id: str) -> Machine | None:
        page: dict[str, Any] = {}
        async with _calling_ec2("describe the machine", missing_ok=True):
            page = await self._ec2.describe_instances(InstanceIds=[machine_id])
        for reservation in page.get("Reservations", []):
            for instance in reservation.get("Instances", []):
                return _machine(instance)
        return None

    async def launch(self, spec: LaunchSpec) -> Machine:
        s = self._settings
        tags = [
            {"Key": TAG_INSTANCE_ID, "Value": str(spec.instance_id)},
            {"Key": TAG_OWNER_ID, "Value": str(spec.owner_id)},
            {"Key": TAG_CONTROL_PLANE, "Value": s.control_plane_id},
            {"Key": "Name", "Value": f"cloudbot-{spec.instance_id.hex[:12]}"},
        ]
        if not s.ec2_subnet_id or not s.ec2_security_group_ids:
            # Without them EC2 picks the default VPC's subnet (public, with a public IP)
            # and its default security group: the machine would not be behind the gateway.
            raise PermanentError(
                "Could not launch the machine: EC2_SUBNET_ID and EC2_SECURITY_GROUP_IDS "
                "must name the private subnet and the gateway-only security group."
            )
        params: dict[str, Any] = {
            "ImageId": s.ec2_ami_id,
            "InstanceType": spec.instance_type,
            "MinCount": 1,
            "MaxCount": 1,
            "ClientToken": client_token(spec),
            "UserData": render_user_data(spec.instance_id, s.public_api_url, spec.bootstrap_token),
            "TagSpecifications": [
                {"ResourceType": "instance", "Tags": tags},
                {"ResourceType": "volume", "Tags": tags},
            ],
            # IMDSv2 only: the user data (and its bootstrap token, until used) is not
            # readable through a simple SSRF on the machine.
            "MetadataOptions": {"HttpTokens": "required", "HttpEndpoint": "enabled"},
            # No public address whatever the subnet's default: only the gateway reaches
            # the machine, over the private network.
            "NetworkInterfaces": [
                {
                    "DeviceIndex": 0,
                    "SubnetId": s.ec2_subnet_id,
                    "Groups": list(s.ec2_security_group_ids),
                    "AssociatePublicIpAddress": False,
                    "DeleteOnTermination": True,
                }
            ],
            # The disk holds the user's provider keys: encrypted (the account's default EBS
            # key unless the account says otherwise).
            "BlockDeviceMappings": [
                {
                    "DeviceName": s.ec2_root_device_name,
                    "Ebs": {
                        "Encrypted": True,
                        "VolumeSize": s.ec2_root_volume_gib,
                        "VolumeType": "gp3",
                        "DeleteOnTermination": True,
                    },
                }
            ],
        }
        if s.ec2_key_name:
            params["KeyName"] = s.ec2_key_name
        async with _calling_ec2("launch the machine"):
            response = await self._ec2.run_instances(**params)
        return _machine(response["Instances"][0])

    async def stop(self, machine_id: str) -> None:
        async with _calling_ec2("stop the machine"):
            await self._ec2.stop_instances(InstanceIds=[machine_id])

    async def start(self, machine_id: str) -> None:
        async with _calling_ec2("start the machine"):
            await self._ec2.start_instances(InstanceIds=[machine_id])

    async def terminate(self, machine_id: str) -> None:
        async with _calling_ec2("terminate the machine", missing_ok=True):
            await self._ec2.terminate_instances(InstanceIds=[machine_id])

    async def list_ours(self) -> list[Machine]:
        return await self._describe(
            "list this control plane's machines",
            Filters=[
                {"Name": f"tag:{TAG_CONTROL_PLANE}", "Values": [self._settings.control_plane_id]},
                {"Name": "instance-state-name", "Values": _NOT_GONE},
            ],
        )
