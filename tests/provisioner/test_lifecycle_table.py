"""The lifecycle table is the one place a command's states are listed: the moves it allows
are the documented ones, and a command added to a copy of it is wired through the API's
request path, the provisioner's task registration and its handler dispatch, up to a real
worker running it, without touching the table everybody else uses."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
from celery import Celery

from cloudbot_api.audit.service import Auditor
from cloudbot_api.errors import ProblemError
from cloudbot_api.instances.service import InstanceService
from cloudbot_api.main import build_resources
from cloudbot_api.unit_of_work import UnitOfWork
from cloudbot_common.audit import Origin
from cloudbot_common.lifecycle import LIFECYCLE, PROVISION, START, STOP, TERMINATE, Lifecycle
from cloudbot_common.models import LIVE_STATES
from cloudbot_common.models import InstanceState as S
from cloudbot_common.settings import Settings
from cloudbot_provisioner.instances import handlers
from cloudbot_provisioner.instances.steps import dispatch
from cloudbot_provisioner.tasks import register_commands
from tests.provisioner.reboot import EXTENDED, HANDLERS, REBOOT, reboot
from tests.support.harness import Db, provisioner

# DESIGN.md's state diagram, less `failed` (reachable from every state but terminated).
DOCUMENTED = {
    (S.PENDING, S.PROVISIONING),
    (S.PROVISIONING, S.RUNNING),
    (S.RUNNING, S.STOPPING),
    (S.STOPPING, S.STOPPED),
    (S.STOPPED, S.STARTING),
    (S.STARTING, S.RUNNING),
    *((live, S.TERMINATING) for live in LIVE_STATES | {S.FAILED}),
    (S.TERMINATING, S.TERMINATED),
}


def allowed(table: Lifecycle) -> set[tuple[S, S]]:
    return {(a, b) for a in S for b in S if b is not S.FAILED and table.can_move(a, b)}


@pytest.mark.fast
def test_the_table_allows_exactly_the_documented_moves():
    assert allowed(LIFECYCLE) == DOCUMENTED
    assert all(LIFECYCLE.can_move(s, S.FAILED) for s in S if s is not S.TERMINATED)
    assert not LIFECYCLE.can_move(S.TERMINATED, S.FAILED)


@pytest.mark.fast
def test_what_follows_from_the_table():
    assert LIFECYCLE.creates is PROVISION
    assert LIFECYCLE.transitional == {
        S.PENDING,
        S.PROVISIONING,
        S.STOPPING,
        S.STARTING,
        S.TERMINATING,
    }
    assert [LIFECYCLE.driving(s) for s in (S.PENDING, S.PROVISIONING, S.STOPPING)] == [
        PROVISION,
        PROVISION,
        STOP,
    ]
    assert LIFECYCLE.driving(S.STARTING) is START
    assert LIFECYCLE.driving(S.TERMINATING) is TERMINATE
    assert LIFECYCLE.driving(S.RUNNING) is None
    # The provisioner has a handler for every command and a task for each.
    assert set(handlers.DISPATCH) == set(LIFECYCLE.commands)


@pytest.mark.fast
def test_a_table_with_a_clash_or_no_creating_command_is_refused():
    with pytest.raises(ValueError, match="verb"):
        LIFECYCLE.with_command(STOP)
    with pytest.raises(ValueError, match="creates"):
        Lifecycle((STOP, START))


def test_a_command_without_its_handler_is_refused_at_start_up():
    with pytest.raises(LookupError, match="no handler for reboot"):
        dispatch(EXTENDED, handlers.HANDLERS)
    with pytest.raises(LookupError, match="lacks: reboot"):
        dispatch(LIFECYCLE, HANDLERS)


def test_an_added_command_gets_its_moves_handler_and_task():
    # The copy allows the new request; the table everybody uses does not.
    assert allowed(EXTENDED) == DOCUMENTED | {(S.RUNNING, S.STARTING)}
    assert not LIFECYCLE.can_move(S.RUNNING, S.STARTING)
    assert REBOOT not in LIFECYCLE.commands

    wired = dispatch(EXTENDED, HANDLERS)
    assert wired[REBOOT] is reboot
    assert {c: wired[c] for c in LIFECYCLE.commands} == handlers.DISPATCH

    celery = Celery("lifecycle-copy", set_as_current=False)
    tasks = register_commands(celery, wired)
    assert set(tasks) == {c.task for c in EXTENDED.commands}
    assert tasks[REBOOT.task].name == "cloudbot.instances.reboot"
    assert REBOOT.task in celery.tasks


async def test_an_added_command_runs_from_the_api_request_to_its_handler(
    store: Db, ec2_env: dict[str, str], tmp_path: Path
):
    """The API's service requests the new command (checked against the copy's states), and
    a worker whose tasks are registered from the copy runs its handler."""
    settings = Settings(**{k.lower(): v for k, v in ec2_env.items()})  # type: ignore[arg-type]
    resources = build_resources(settings)
    owner = await store.user()

    async def request_reboot(instance_id: uuid.UUID) -> str:
        async with resources.sessions() as session:
            uow = UnitOfWork(session)
            service = InstanceService(
                uow,
                settings=resources.settings,
                redis=resources.redis,
                celery=resources.celery,
                sessions=resources.sessions,
                audit=Auditor(uow, origin=Origin()),
                request_id=None,
            )
            instance = await service.request(owner, instance_id, REBOOT, actor="test")
            await uow.commit()  # publishes the command once committed, as a request does
            return instance.state

    try:
        with provisioner(ec2_env, tmp_path, app="tests.provisioner.reboot_worker"):
            instance_id, _ = await store.create_instance(owner, "ec2")
            await store.wait_state(instance_id, S.RUNNING)

            assert await request_reboot(instance_id) == S.STARTING
            await store.wait_state(instance_id, S.RUNNING)
            assert (await store.history(instance_id))[-3:] == ["running", "starting", "running"]
            assert await store.open_commands(instance_id) == 0

            # Not from a state the command does not start from: the API's 409.
            await store.command(instance_id, STOP)
            await store.wait_state(instance_id, S.STOPPED)
            with pytest.raises(ProblemError) as refused:
                await request_reboot(instance_id)
            assert (refused.value.status, refused.value.extra) == (409, {"state": "stopped"})
    finally:
        await resources.close()
