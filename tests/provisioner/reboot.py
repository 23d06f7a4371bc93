"""A command the lifecycle does not have, added the way a new one is: one entry in (a copy
of) the table and its handler. Importing this changes nothing global; `reboot_worker`
builds a worker process from it."""

from __future__ import annotations

from cloudbot_common.lifecycle import LIFECYCLE, Command
from cloudbot_common.models import InstanceState as S
from cloudbot_provisioner.errors import PermanentError
from cloudbot_provisioner.instances import handlers
from cloudbot_provisioner.instances.steps import Done, Handler, Outcome, Snapshot, Step

REBOOT = Command(
    verb="reboot",
    task="cloudbot.instances.reboot",
    requests=S.STARTING,
    starts_from=frozenset({S.RUNNING}),
    drives_to=S.RUNNING,
)
EXTENDED = LIFECYCLE.with_command(REBOOT)


async def reboot(step: Step) -> Outcome:
    """Power-cycle the machine (stop, then start), then the instance is running again."""
    async with step.locked() as tx:
        if tx.instance is None or not tx.is_in(*REBOOT.drives):
            await tx.complete(step.command_id)
            return Done()
        snap = Snapshot.of(tx.instance)
    machine = await step.machine_of(snap)
    if machine is None:
        raise PermanentError("The machine to reboot is gone.")
    await step.backend.stop(machine.id)
    await step.backend.start(machine.id)
    async with step.locked() as tx:
        if tx.is_in(REBOOT.requests):
            await tx.move(REBOOT.drives_to)
        await tx.complete(step.command_id)
    return Done()


HANDLERS: dict[str, Handler] = {**handlers.HANDLERS, REBOOT.verb: reboot}
