"""What each command does to an instance and its machine.

A handler looks at where the instance row and its machine are, takes the next step, and
either finishes (`Done`: the command is complete) or asks to be called again later
(`Wait`), so waiting for a machine never holds a worker slot. Each is safe to run twice
or concurrently with a duplicate: the per-instance guard serialises them, every state
change is re-checked under the row lock, and machines are found again by their tag.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from sqlalchemy.ext.asyncio import AsyncSession

from cloudbot_common.commands import Command
from cloudbot_common.db import unit_of_work
from cloudbot_common.events import InstanceStateEvent
from cloudbot_common.lifecycle import lock_instance, transition
from cloudbot_common.logging import get_logger
from cloudbot_common.models import LIVE_STATES, Instance
from cloudbot_common.models import InstanceState as S
from cloudbot_common.security.opaque import bootstrap_token, token_digest
from cloudbot_provisioner import repository
from cloudbot_provisioner.backends.base import Backend, LaunchSpec, Machine, MachineState
from cloudbot_provisioner.errors import PermanentError
from cloudbot_provisioner.instances.guard import exclusive
from cloudbot_provisioner.runtime import Runtime

log = get_logger(__name__)

# The states each command drives an instance out of; in any other state it has nothing
# left to do (the instance moved on, say deleted while it was stopping).
DRIVES: dict[Command, frozenset[S]] = {
    Command.PROVISION: frozenset({S.PENDING, S.PROVISIONING}),
    Command.STOP: frozenset({S.STOPPING}),
    Command.START: frozenset({S.STARTING}),
    Command.TERMINATE: frozenset({S.TERMINATING}),
}
VANISHED = "The machine no longer exists; it was ended outside CloudBot."
# Another handler holds the instance: look again shortly.
_BUSY_SECONDS = 1.0


@dataclass(frozen=True, slots=True)
class Done:
    pass


@dataclass(frozen=True, slots=True)
class Wait:
    seconds: float
    # When waiting for the machine began (epoch seconds); bounds the whole wait.
    since: float | None


Outcome = Done | Wait


@dataclass(slots=True)
class Tx:
    """The locked instance row in an open transaction, and the events to publish once
    it commits."""

    session: AsyncSession
    instance: Instance | None
    events: list[InstanceStateEvent] = field(default_factory=list)

    def is_in(self, *states: S) -> bool:
        return self.instance is not None and self.instance.state in states

    async def move(self, new: S, reason: str | None = None) -> None:
        assert self.instance is not None
        self.events.append(await transition(self.session, self.instance, new, reason))

    async def complete(self, command_id: uuid.UUID) -> None:
        await repository.complete_command(self.session, command_id)

    async def end_vanished(self, reason: str = VANISHED) -> None:
        """The machine is gone for good: so is the instance."""
        if self.instance is None:
            return
        if self.instance.state in LIVE_STATES or self.instance.state == S.FAILED:
            await self.move(S.TERMINATING, reason)
        if self.instance.state == S.TERMINATING:
            await self.move(S.TERMINATED, reason)


@asynccontextmanager
async def locked(rt: Runtime, instance_id: uuid.UUID) -> AsyncIterator[Tx]:
    """A transaction holding the instance row; its events are published after commit."""
    async with unit_of_work(rt.sessions) as session:
        tx = Tx(session, await lock_instance(session, instance_id))
        yield tx
    await rt.publish(tx.events)


@dataclass(frozen=True, slots=True)
class Snapshot:
    """What a handler needs of the row once the lock is released."""

    id: uuid.UUID
    owner_id: uuid.UUID
    name: str
    instance_type: str
    backend_instance_id: str | None

    @classmethod
    def of(cls, instance: Instance) -> Snapshot:
        return cls(
            id=instance.id,
            owner_id=instance.owner_id,
            name=instance.name,
            instance_type=instance.instance_type,
            backend_instance_id=instance.backend_instance_id,
        )


@dataclass(frozen=True, slots=True)
class Step:
    rt: Runtime
    instance_id: uuid.UUID
    command_id: uuid.UUID
    waiting_since: float | None

    @property
    def backend(self) -> Backend:
        return self.rt.backend

    def locked(self) -> AbstractAsyncContextManager[Tx]:
        return locked(self.rt, self.instance_id)

    async def finish(self) -> Done:
        """Complete the command without a state change (there is nothing left to do)."""
        async with self.locked() as tx:
            await tx.complete(self.command_id)
        return Done()

    async def machine_of(self, snap: Snapshot) -> Machine | None:
        """The instance's machine: the recorded one, else the oldest carrying its tag."""
        if snap.backend_instance_id is not None:
            machine = await self.backend.describe(snap.backend_instance_id)
            if machine is not None:
                return machine
        found = await self.backend.find(snap.id)
        return found[0] if found else None

    async def refreshed(self, machine: Machine) -> Machine:
        return await self.backend.describe(machine.id) or machine

    def wait(self, what: str) -> Wait:
        now = time.time()
        since = self.waiting_since or now
        timeout = self.rt.settings.transition_timeout_seconds
        if now - since > timeout:
            raise PermanentError(f"The machine did not {what} within {timeout} seconds.")
        # Poll soon at first (most machines settle quickly), then back off to 10 s.
        return Wait(seconds=min(10.0, 1.0 + (now - since) / 5), since=since)

    def check_backend(self, instance: Instance) -> None:
        if instance.backend != self.backend.name:
            raise PermanentError(
                f"This provisioner runs {self.backend.name} machines; "
                f"the instance is on {instance.backend}."
            )


def _record_machine(instance: Instance, machine: Machine) -> None:
    instance.backend_instance_id = machine.id
    if machine.host is not None:
        instance.host = machine.host
        instance.vnc_port = machine.vnc_port
        instance.agent_port = machine.agent_port


# --- Commands ---------------------------------------------------------------------------


async def provision(step: Step) -> Outcome:
    async with step.locked() as tx:
        if tx.instance is None or not tx.is_in(S.PENDING, S.PROVISIONING):
            await tx.complete(step.command_id)
            return Done()
        step.check_backend(tx.instance)
        if tx.instance.state == S.PENDING:
            await tx.move(S.PROVISIONING)
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
        if machine is not None and tx.instance.state != S.TERMINATED:
            # Recorded even if a delete arrived meanwhile: terminate needs to know it.
            _record_machine(tx.instance, machine)
        if not tx.is_in(S.PROVISIONING):
            await tx.complete(step.command_id)
            return Done()
        if machine is not None and machine.state is MachineState.RUNNING:
            await tx.move(S.RUNNING)
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
        if tx.instance is None or not tx.is_in(S.PROVISIONING):
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


async def stop(step: Step) -> Outcome:
    return await _power(step, S.STOPPING, MachineState.RUNNING, MachineState.STOPPED, S.STOPPED)


async def start(step: Step) -> Outcome:
    return await _power(step, S.STARTING, MachineState.STOPPED, MachineState.RUNNING, S.RUNNING)


async def _power(
    step: Step, moving: S, from_machine: MachineState, to_machine: MachineState, arrived: S
) -> Outcome:
    """Stop or start: ask the backend once the machine is in `from_machine`, and move the
    instance from `moving` to `arrived` once the machine shows `to_machine`."""
    async with step.locked() as tx:
        if tx.instance is None or not tx.is_in(moving):
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
            if tx.instance is not None and tx.is_in(moving):
                # A started EC2 machine may come back on another address.
                _record_machine(tx.instance, machine)
                await tx.move(arrived)
            await tx.complete(step.command_id)
        log.info("instance power state changed", instance_id=str(snap.id), state=arrived.value)
        return Done()
    return step.wait("stop" if stopping else "start")


async def terminate(step: Step) -> Outcome:
    async with step.locked() as tx:
        if tx.instance is None or not tx.is_in(S.TERMINATING):
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
        if tx.instance is not None and tx.is_in(S.TERMINATING):
            await tx.move(S.TERMINATED)
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


_HANDLERS: dict[Command, Callable[[Step], Awaitable[Outcome]]] = {
    Command.PROVISION: provision,
    Command.STOP: stop,
    Command.START: start,
    Command.TERMINATE: terminate,
}


async def handle(
    rt: Runtime,
    command: Command,
    instance_id: uuid.UUID,
    command_id: uuid.UUID,
    waiting_since: float | None,
) -> Outcome:
    """Run one delivery of a command. Raises TransientError or PermanentError."""
    async with exclusive(rt.engine, instance_id) as held:
        if not held:
            return Wait(seconds=_BUSY_SECONDS, since=waiting_since)
        async with rt.sessions() as session:
            if await repository.command_completed(session, command_id):
                log.info("command already done; duplicate delivery dropped")
                return Done()
        return await _HANDLERS[command](Step(rt, instance_id, command_id, waiting_since))


async def give_up(
    rt: Runtime, command: Command, instance_id: uuid.UUID, command_id: uuid.UUID, reason: str
) -> None:
    """The command failed for good: the instance becomes `failed`, if the command still
    drives it, with a reason a person can read."""
    async with locked(rt, instance_id) as tx:
        if tx.instance is not None and tx.instance.state in DRIVES[command]:
            await tx.move(S.FAILED, reason)
        await tx.complete(command_id)
    log.warning("command failed", command=command.value, reason=reason)
