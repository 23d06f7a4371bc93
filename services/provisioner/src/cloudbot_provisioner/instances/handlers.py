"""What each command of the lifecycle table does to an instance and its machine.

Each handler is registered for its command with `@handles`; the table
(`cloudbot_common.lifecycle`) says which states it drives the instance out of and to, so
a handler names its command's states through it, never as literals. Each is safe to run
twice or concurrently with a duplicate: the per-instance guard serialises them, every
state change is re-checked under the row lock, and machines are found again by their tag.
The machinery they use (Step, Tx, Snapshot) is `steps.py`'s.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from cloudbot_common.lifecycle import LIFECYCLE, PROVISION, START, STOP, TERMINATE, Command
from cloudbot_common.logging import get_logger
from cloudbot_common.models import Instance
from cloudbot_common.security.opaque import bootstrap_token, token_digest
from cloudbot_provisioner.backends.base import LaunchSpec, Machine, MachineState
from cloudbot_provisioner.errors import PermanentError
from cloudbot_provisioner.instances.steps import (
    Done,
    Handler,
    Outcome,
    Snapshot,
    Step,
    dispatch,
)

log = get_logger(__name__)

# Each command's handler, by verb; filled by `@handles` below.
HANDLERS: dict[str, Handler] = {}


def handles(command: Command) -> Callable[[Handler], Handler]:
    def register(handler: Handler) -> Handler:
        HANDLERS[command.verb] = handler
        return handler

    return register


def _record_machine(instance: Instance, machine: Machine) -> None:
    instance.backend_instance_id = machine.id
    if machine.host is not None:
        instance.host = machine.host
        instance.vnc_port = machine.vnc_port
        instance.agent_port = machine.agent_port


# --- Commands ---------------------------------------------------------------------------


@handles(PROVISION)
async def provision(step: Step) -> Outcome:
    working = PROVISION.via or PROVISION.requests
    async with step.locked() as tx:
        if tx.instance is None or not tx.is_in(*PROVISION.drives):
            await tx.complete(step.command_id)
            return Done()
        step.check_backend(tx.instance)
        if tx.instance.state != working:
            await tx.move(working)
        snap = Snapshot.of(tx.instance)

    machine = await step.machine_of(snap)
    if machine is None and snap.backend_instance_id is None:
        machine = await _launch(step, snap)
        if machine is None:
            return await step.finish()
    if machine is not None and machine.state is MachineState.STOPPED:
        # Stopped before it was ever handed over: bring it up rather than launch another.
        await step.backend.start(machine.id)
        machine = await step.refreshed(machine)
    if machine is not None and machine.state is MachineState.GONE:
        raise PermanentError("The machine ended while it was being set up.")

    async with step.locked() as tx:
        if tx.instance is None:
            await tx.complete(step.command_id)
            return Done()
        if machine is not None and tx.instance.state != TERMINATE.drives_to:
            # Recorded even if a delete arrived meanwhile: terminate needs to know it.
            _record_machine(tx.instance, machine)
        if not tx.is_in(working):
            await tx.complete(step.command_id)
            return Done()
        if machine is not None and machine.state is MachineState.RUNNING:
            await tx.move(PROVISION.drives_to)
            await tx.complete(step.command_id)
            log.info("instance running", instance_id=str(snap.id), machine_id=machine.id)
            return Done()
    # Not running yet, or (EC2 being eventually consistent) not visible yet.
    return step.wait("start up")


async def _launch(step: Step, snap: Snapshot) -> Machine | None:
    """Store the bootstrap token's digest, then launch. None: nothing to launch any more
    (the instance moved on).

    A relaunch keeps the token of the attempt before it while at least half its lifetime
    is left (`bootstrap_token` derives it from the stored expiry): that attempt's machine
    may exist unseen (EC2 lists new machines late), and must still be able to bootstrap.
    """
    settings = step.rt.settings
    ttl = timedelta(seconds=settings.bootstrap_token_ttl_seconds)
    # Committed before the launch: the machine must never carry a token we do not know.
    async with step.locked() as tx:
        if tx.instance is None or not tx.is_in(PROVISION.via or PROVISION.requests):
            return None
        now = datetime.now(UTC)
        expires = tx.instance.bootstrap_expires_at
        if tx.instance.bootstrap_token_hash is None or expires is None or expires - now < ttl / 2:
            expires = tx.instance.bootstrap_expires_at = now + ttl
        token = bootstrap_token(settings.agent_token_secret.get_secret_value(), snap.id, expires)
        tx.instance.bootstrap_token_hash = token_digest(token)
    machine = await step.backend.launch(
        LaunchSpec(
            instance_id=snap.id,
            owner_id=snap.owner_id,
            name=snap.name,
            instance_type=snap.instance_type,
            bootstrap_token=token,
        )
    )
    log.info("machine launched", instance_id=str(snap.id), machine_id=machine.id)
    return await step.refreshed(machine)


@handles(STOP)
async def stop(step: Step) -> Outcome:
    return await _power(step, STOP, MachineState.RUNNING, MachineState.STOPPED)


@handles(START)
async def start(step: Step) -> Outcome:
    return await _power(step, START, MachineState.STOPPED, MachineState.RUNNING)


async def _power(
    step: Step, command: Command, from_machine: MachineState, to_machine: MachineState
) -> Outcome:
    """Stop or start: ask the backend once the machine is in `from_machine`, and move the
    instance on from the state `command` requested once the machine shows `to_machine`."""
    async with step.locked() as tx:
        if tx.instance is None or not tx.is_in(command.requests):
            await tx.complete(step.command_id)
            return Done()
        step.check_backend(tx.instance)
        snap = Snapshot.of(tx.instance)

    machine = await step.machine_of(snap)
    if machine is None or machine.state is MachineState.GONE:
        return await _vanished(step)
    stopping = to_machine is MachineState.STOPPED
    if machine.state is from_machine:
        await (step.backend.stop if stopping else step.backend.start)(machine.id)
        machine = await step.refreshed(machine)
    if machine.state is to_machine:
        async with step.locked() as tx:
            if tx.instance is not None and tx.is_in(command.requests):
                # A started EC2 machine may come back on another address.
                _record_machine(tx.instance, machine)
                await tx.move(command.drives_to)
            await tx.complete(step.command_id)
        log.info(
            "instance power state changed",
            instance_id=str(snap.id),
            state=command.drives_to.value,
        )
        return Done()
    return step.wait(command.verb)


@handles(TERMINATE)
async def terminate(step: Step) -> Outcome:
    async with step.locked() as tx:
        if tx.instance is None or not tx.is_in(TERMINATE.requests):
            await tx.complete(step.command_id)
            return Done()
        snap = Snapshot.of(tx.instance)

    # Every machine carrying the tag, not only the recorded one: a duplicate launched
    # around a crash ends with its instance.
    machines = {m.id: m for m in await step.backend.find(snap.id)}
    if snap.backend_instance_id is not None and snap.backend_instance_id not in machines:
        recorded = await step.backend.describe(snap.backend_instance_id)
        if recorded is not None:
            machines[recorded.id] = recorded
    remaining = []
    for machine in machines.values():
        if machine.state is not MachineState.GONE:
            await step.backend.terminate(machine.id)
            after = await step.backend.describe(machine.id)
            if after is not None and after.state is not MachineState.GONE:
                remaining.append(after)
    if remaining:
        return step.wait("terminate")

    async with step.locked() as tx:
        if tx.instance is not None and tx.is_in(TERMINATE.requests):
            await tx.move(TERMINATE.drives_to)
            tx.instance.bootstrap_token_hash = None
            tx.instance.bootstrap_expires_at = None
        await tx.complete(step.command_id)
    log.info("instance terminated", instance_id=str(snap.id))
    return Done()


async def _vanished(step: Step) -> Done:
    async with step.locked() as tx:
        await tx.end_vanished()
        await tx.complete(step.command_id)
    log.warning("machine vanished", instance_id=str(step.instance_id))
    return Done()


# Every command of the table with its handler; refused at import if one is missing.
DISPATCH = dispatch(LIFECYCLE, HANDLERS)
