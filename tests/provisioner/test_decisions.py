"""The provisioner's pure decisions: what an EC2 error means for a retry, and which
machine is an orphan to terminate."""

from __future__ import annotations

import uuid

import pytest
from botocore.exceptions import ClientError

from cloudbot_common.models import Instance
from cloudbot_common.models import InstanceState as S
from cloudbot_provisioner.backends.base import Machine, MachineState
from cloudbot_provisioner.backends.ec2 import _describe_error
from cloudbot_provisioner.errors import PermanentError, TransientError
from cloudbot_provisioner.reconciler import _is_orphan

pytestmark = pytest.mark.fast


def client_error(code: str, message: str = "", status: int = 400) -> ClientError:
    return ClientError(
        {
            "Error": {"Code": code, "Message": message},
            "ResponseMetadata": {"HTTPStatusCode": status},
        },
        "RunInstances",
    )


@pytest.mark.parametrize(
    ("code", "status", "kind", "words"),
    [
        ("RequestLimitExceeded", 503, TransientError, "throttling"),
        ("InsufficientInstanceCapacity", 500, TransientError, "no capacity"),
        ("IncorrectInstanceState", 400, TransientError, "changing state"),
        ("InternalError", 500, TransientError, "server error"),
        ("SomethingNew", 502, TransientError, "server error"),  # any 5xx is worth a retry
        ("UnauthorizedOperation", 403, PermanentError, "refused the request"),
        ("InvalidAMIID.Malformed", 400, PermanentError, "refused the request"),
    ],
)
def test_ec2_errors_are_told_apart_for_retries(code, status, kind, words):
    error = _describe_error(client_error(code, "details here", status), "start the machine")
    assert type(error) is kind
    text = str(error)
    assert text.startswith("Could not start the machine")
    assert words in text
    assert code in text


def test_a_refusal_carries_ec2s_message_for_the_user():
    error = _describe_error(client_error("InvalidParameterValue", "bad subnet"), "launch")
    assert (
        str(error)
        == "Could not launch: EC2 refused the request (InvalidParameterValue: bad subnet)."
    )


def machine(machine_id: str = "i-1", instance_id: uuid.UUID | None = None) -> Machine:
    return Machine(
        id=machine_id,
        state=MachineState.RUNNING,
        instance_id=str(instance_id) if instance_id else None,
        host="10.0.0.1",
        vnc_port=5900,
        agent_port=7878,
    )


def row(state: S, backend_instance_id: str | None = None) -> Instance:
    return Instance(id=uuid.uuid4(), state=state, backend_instance_id=backend_instance_id)


def test_a_machine_without_a_live_row_is_an_orphan():
    assert _is_orphan(machine(), None)
    for state in (S.TERMINATED, S.FAILED):
        assert _is_orphan(machine(), row(state, "i-1"))


@pytest.mark.parametrize(
    "state", [S.PENDING, S.PROVISIONING, S.RUNNING, S.STOPPING, S.STOPPED, S.STARTING]
)
def test_a_live_rows_own_machine_is_kept(state):
    assert not _is_orphan(machine("i-1"), row(state, "i-1"))
    # Not yet recorded on the row (a launch under way): kept too.
    assert not _is_orphan(machine("i-1"), row(state, None))


def test_a_second_machine_of_a_live_row_is_an_orphan_once_the_first_is_recorded():
    assert _is_orphan(machine("i-2"), row(S.RUNNING, "i-1"))
    # While the row is still being provisioned, a retried launch's machine may be the
    # one adopted: not an orphan yet.
    assert not _is_orphan(machine("i-2"), row(S.PROVISIONING, "i-1"))
    assert not _is_orphan(machine("i-2"), row(S.PENDING, "i-1"))


def test_a_terminating_rows_machine_is_left_to_the_terminate_command():
    assert not _is_orphan(machine("i-1"), row(S.TERMINATING, "i-1"))
