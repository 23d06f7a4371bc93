"""The instance lifecycle, declared once: its commands, and the one way to move a state.

`LIFECYCLE` below is the only place a command's states are listed. Everything else is read
off it: the API's requests (which states a request is accepted in, and the state it asks
for), the provisioner's Celery tasks (one per command, named by its task name), which
handler runs a delivery, which states a handler drives an instance out of, the state moves
`transition` allows, and which command a stuck instance is sent again. Adding a command
is one entry here plus its handler in the provisioner (and a route in the API, if users
may ask for it).

Who writes an instance's state, and nobody else:

- A request writes its own move, and only that: a new instance starts in the state its
  creating command requests (`pending`), and an accepted stop, start or delete moves the
  instance from one of the command's `starts_from` to its `requests` (`stopping`,
  `starting`, `terminating`). It does so under the row lock, in the same transaction that
  stages the command in the outbox (`cloudbot_common.commands.request_command`), so a
  requested state never exists without the command that will drive it on. The API makes
  these requests for users; the provisioner's idle sweep makes one more, a stop, for a
  machine nobody uses (reason `idle`).
- The provisioner writes every other move: its handlers take an instance from the state a
  command requested, through `via`, to `drives_to`, or to `failed` (with a reason) when the
  command gives up; its reconciler records what happened outside CloudBot (a machine
  stopped: `running -> stopping -> stopped`; a machine gone: `-> terminating ->
  terminated`).
- Heartbeats from the machine write its health and activity, never its state.

Every move goes through `request` (a request's) or `transition` (the provisioner's), which
write the row and its history entry in the caller's transaction and hand back the event to
publish once that commits.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from itertools import pairwise

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from cloudbot_common import webhooks
from cloudbot_common.events import InstanceStateEvent
from cloudbot_common.models import LIVE_STATES, Instance, InstanceEvent
from cloudbot_common.models import InstanceState as S


@dataclass(frozen=True, slots=True)
class Command:
    """One thing the control plane can be asked to do to an instance."""

    # How people and logs name it: the API's action, the handler's key, "could not <verb>".
    verb: str
    # The Celery task the provisioner runs it as; the API knows the provisioner by this only.
    task: str
    # The state the API moves the instance to when it accepts the request.
    requests: S
    # The states a request is accepted in; none for the command that creates an instance.
    starts_from: frozenset[S]
    # Where the provisioner takes the instance once the work is done.
    drives_to: S
    # A state the provisioner passes through on the way, if any.
    via: S | None = None

    @property
    def drives(self) -> frozenset[S]:
        """The states this command drives an instance out of. In any other state it has
        nothing left to do (the instance moved on, say deleted while it was stopping)."""
        return frozenset({self.requests} | ({self.via} if self.via else set()))

    def moves(self) -> Iterator[tuple[S, S]]:
        for start in self.starts_from:
            yield start, self.requests
        steps = [self.requests, *([self.via] if self.via else []), self.drives_to]
        yield from pairwise(steps)


@dataclass(frozen=True)
class Lifecycle:
    """A table of commands, and what follows from it."""

    commands: tuple[Command, ...]
    _moves: Mapping[S, frozenset[S]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        verbs = [c.verb for c in self.commands]
        tasks = [c.task for c in self.commands]
        if len(set(verbs)) != len(verbs) or len(set(tasks)) != len(tasks):
            raise ValueError("each command needs a verb and a task name of its own")
        if len([c for c in self.commands if not c.starts_from]) != 1:
            raise ValueError("exactly one command creates an instance (no starts_from)")
        moves: dict[S, set[S]] = {state: set() for state in S}
        for command in self.commands:
            for start, end in command.moves():
                moves[start].add(end)
        object.__setattr__(self, "_moves", {s: frozenset(m) for s, m in moves.items()})

    def __getitem__(self, verb: str) -> Command:
        for command in self.commands:
            if command.verb == verb:
                return command
        raise KeyError(verb)

    def with_command(self, command: Command) -> Lifecycle:
        """A copy of this table with one more command (this one is left as it is)."""
        return Lifecycle((*self.commands, command))

    @property
    def creates(self) -> Command:
        """The command that brings an instance into being."""
        return next(c for c in self.commands if not c.starts_from)

    @property
    def transitional(self) -> frozenset[S]:
        """States some command is still working on."""
        return frozenset(s for c in self.commands for s in c.drives)

    def driving(self, state: S | str) -> Command | None:
        """The command that takes an instance on from `state` (the first in the table if
        several do): the one to send again when an instance is stuck there."""
        return next((c for c in self.commands if S(state) in c.drives), None)

    def can_move(self, current: S | str, new: S | str) -> bool:
        current, new = S(current), S(new)
        if new is S.FAILED:
            # Any command may give up, and the reconciler may find anything broken.
            return current is not S.TERMINATED
        return new in self._moves[current]


# --- The table ----------------------------------------------------------------------------

PROVISION = Command(
    verb="provision",
    task="cloudbot.instances.provision",
    requests=S.PENDING,
    starts_from=frozenset(),
    via=S.PROVISIONING,
    drives_to=S.RUNNING,
)
STOP = Command(
    verb="stop",
    task="cloudbot.instances.stop",
    requests=S.STOPPING,
    starts_from=frozenset({S.RUNNING}),
    drives_to=S.STOPPED,
)
START = Command(
    verb="start",
    task="cloudbot.instances.start",
    requests=S.STARTING,
    starts_from=frozenset({S.STOPPED}),
    drives_to=S.RUNNING,
)
TERMINATE = Command(
    verb="terminate",
    task="cloudbot.instances.terminate",
    requests=S.TERMINATING,
    # A failed instance may still hold a machine: deleting it ends that too.
    starts_from=LIVE_STATES | {S.FAILED},
    drives_to=S.TERMINATED,
)
LIFECYCLE = Lifecycle((PROVISION, STOP, START, TERMINATE))


# --- Moving a state -----------------------------------------------------------------------


def can_move(current: S | str, new: S | str) -> bool:
    return LIFECYCLE.can_move(current, new)


class TransitionError(Exception):
    def __init__(self, current: str, new: str) -> None:
        super().__init__(f"cannot move from {current} to {new}")
        self.current = current
        self.new = new


async def lock_instance(session: AsyncSession, instance_id: object) -> Instance | None:
    """The instance row, locked for this transaction (state guards depend on it)."""
    result = await session.scalars(
        select(Instance).where(Instance.id == instance_id).with_for_update()
    )
    return result.one_or_none()


async def request(
    session: AsyncSession, instance: Instance, command: Command, reason: str | None = None
) -> InstanceStateEvent:
    """The move a request for `command` makes: from one of the command's own `starts_from`
    to what it requests. The caller holds the row lock and commits."""
    if instance.state not in command.starts_from:
        raise TransitionError(instance.state, command.requests.value)
    return await _move(session, instance, command.requests, reason)


async def begin(session: AsyncSession, instance: Instance, command: Command) -> InstanceStateEvent:
    """A new instance (added to `session`, not yet flushed) starts in the state its
    creating command requests, with its first history entry."""
    if command.starts_from:
        raise ValueError(f"{command.verb} does not create an instance")
    instance.state = command.requests.value
    session.add(instance)
    await session.flush()
    return await _record(session, instance, None)


async def transition(
    session: AsyncSession,
    instance: Instance,
    new: S,
    reason: str | None = None,
) -> InstanceStateEvent:
    """Move `instance` to `new`, recording history (the provisioner's writes). The caller
    holds the row lock and commits; publish the returned event after the commit."""
    if not can_move(instance.state, new):
        raise TransitionError(instance.state, new.value)
    return await _move(session, instance, new, reason)


async def _move(
    session: AsyncSession, instance: Instance, new: S, reason: str | None
) -> InstanceStateEvent:
    instance.state = new.value
    instance.state_reason = reason
    instance.state_changed_at = datetime.now(UTC)
    if new in (S.STOPPED, S.TERMINATED, S.FAILED):
        instance.desktop_healthy = None
        instance.agent_healthy = None
    return await _record(session, instance, reason)


async def _record(
    session: AsyncSession, instance: Instance, reason: str | None
) -> InstanceStateEvent:
    entry = InstanceEvent(instance_id=instance.id, state=instance.state, reason=reason)
    session.add(entry)
    await session.flush()
    # Owed to the owner's webhooks, in the same transaction as the change (an outbox).
    await webhooks.enqueue(session, instance, entry, webhooks.STATE_CHANGED)
    return InstanceStateEvent(
        event_id=entry.id,
        instance_id=str(instance.id),
        owner_id=str(instance.owner_id),
        state=instance.state,
        reason=reason,
    )
