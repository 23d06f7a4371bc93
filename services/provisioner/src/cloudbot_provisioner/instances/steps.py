"""The machinery a command handler (and the reconciler) works with.

A handler looks at where the instance row and its machine are, takes the next step, and
either finishes (`Done`: the command is complete) or asks to be called again later
(`Wait`), so waiting for a machine never holds a worker slot. State changes happen in
short transactions holding the row (`locked`, `Tx`); slow cloud calls happen between them,
on a `Snapshot` of the row. `run` serialises handlers per instance and drops duplicate
deliveries; `dispatch` pairs each command of a lifecycle table with its handler.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field

from sqlalchemy.ext.asyncio import AsyncSession

from cloudbot_common.db import unit_of_work
from cloudbot_common.events import InstanceStateEvent
from cloudbot_common.lifecycle import TERMINATE, Command, Lifecycle, lock_instance, transition
from cloudbot_common.logging import get_logger
from cloudbot_common.models import Instance
from cloudbot_common.models import InstanceState as S
from cloudbot_provisioner import repository
from cloudbot_provisioner.backends.base import Backend, Machine
from cloudbot_provisioner.errors import PermanentError
from cloudbot_provisioner.instances.guard import exclusive
from cloudbot_provisioner.runtime import Runtime

log = get_logger(__name__)

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
        if self.instance.state in TERMINATE.starts_from:
            await self.move(TERMINATE.requests, reason)
        if self.instance.state == TERMINATE.requests:
            await self.move(TERMINATE.drives_to, reason)


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
    """One delivery of a command, as its handler sees it."""

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


Handler = Callable[[Step], Awaitable[Outcome]]


def dispatch(lifecycle: Lifecycle, handlers: Mapping[str, Handler]) -> dict[Command, Handler]:
    """Each command of `lifecycle` with its handler (`handlers` is keyed by verb). A command
    without a handler, or a handler without a command, is refused here, at start-up."""
    verbs = {command.verb for command in lifecycle.commands}
    if missing := verbs - handlers.keys():
        raise LookupError(f"no handler for {', '.join(sorted(missing))}")
    if stray := handlers.keys() - verbs:
        raise LookupError(f"handlers for commands the lifecycle lacks: {', '.join(sorted(stray))}")
    return {command: handlers[command.verb] for command in lifecycle.commands}


async def run(
    rt: Runtime,
    handler: Handler,
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
        return await handler(Step(rt, instance_id, command_id, waiting_since))


async def give_up(
    rt: Runtime, command: Command, instance_id: uuid.UUID, command_id: uuid.UUID, reason: str
) -> None:
    """The command failed for good: the instance becomes `failed`, if the command still
    drives it, with a reason a person can read."""
    async with locked(rt, instance_id) as tx:
        if tx.instance is not None and tx.instance.state in command.drives:
            await tx.move(S.FAILED, reason)
        await tx.complete(command_id)
    log.warning("command failed", command=command.verb, reason=reason)
