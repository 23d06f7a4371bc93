"""The reconciler: makes Postgres and the backend agree again, on a schedule.

- A row whose machine vanished (ended outside CloudBot) becomes terminated.
- A machine tagged with this control plane's id and no live row (its instance failed,
  was deleted, or it is a duplicate from a crash) is terminated.
- A running row whose machine was stopped outside CloudBot becomes stopped.
- A row stuck in a transitional state longer than TRANSITION_TIMEOUT_SECONDS with no
  command in flight gets its command again.

Each fix is taken under the instance's guard, so it never races a command handler; a
busy instance is simply left for the next run.
"""

from __future__ import annotations

import uuid
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta

from cloudbot_common.commands import add_command, publish
from cloudbot_common.db import unit_of_work
from cloudbot_common.lifecycle import LIFECYCLE, PROVISION, STOP, lock_instance
from cloudbot_common.logging import get_logger
from cloudbot_common.models import LIVE_STATES, Instance
from cloudbot_common.models import InstanceState as S
from cloudbot_provisioner import repository
from cloudbot_provisioner.backends.base import Machine, MachineState
from cloudbot_provisioner.instances.guard import exclusive
from cloudbot_provisioner.instances.steps import locked
from cloudbot_provisioner.runtime import Runtime

log = get_logger(__name__)

DRIFTED = "The machine was stopped outside CloudBot."
# States in which a machine belongs to its row; a machine of any other row is an orphan.
_OWNS_MACHINE = LIVE_STATES | {S.TERMINATING}


@dataclass(slots=True)
class Report:
    orphans_terminated: int = 0
    vanished: int = 0
    drifted: int = 0
    redriven: int = 0


def _instance_uuid(machine: Machine) -> uuid.UUID | None:
    try:
        return uuid.UUID(machine.instance_id) if machine.instance_id else None
    except ValueError:
        return None


async def reconcile(rt: Runtime) -> Report:
    report = Report()
    machines = await rt.backend.list_ours()
    async with rt.sessions() as session:
        rows = {i.id: i for i in await repository.instances_on_backend(session, rt.backend.name)}

    for machine in machines:
        instance_id = _instance_uuid(machine)
        row = rows.get(instance_id) if instance_id else None
        if _is_orphan(machine, row):
            if await _terminate_orphan(rt, machine, instance_id):
                report.orphans_terminated += 1
        elif (
            row is not None
            and row.state == S.RUNNING
            and machine.state is MachineState.STOPPED
            and await _record_drift(rt, row.id, machine)
        ):
            report.drifted += 1

    listed = {m.id for m in machines}
    for row in rows.values():
        if (
            row.state in (S.RUNNING, S.STOPPED)
            and row.backend_instance_id is not None
            and row.backend_instance_id not in listed
            and await _end_if_vanished(rt, row.id, row.backend_instance_id)
        ):
            report.vanished += 1

    report.redriven = await _redrive_stuck(rt)
    if report != Report():
        log.info("reconciled", **asdict(report))
    return report


def _is_orphan(machine: Machine, row: Instance | None) -> bool:
    if row is None or row.state not in _OWNS_MACHINE:
        return True
    # A second machine of a live instance, once the first is recorded and handed over.
    return (
        row.backend_instance_id is not None
        and row.backend_instance_id != machine.id
        and row.state not in PROVISION.drives
    )


async def _terminate_orphan(rt: Runtime, machine: Machine, instance_id: uuid.UUID | None) -> bool:
    if instance_id is None:
        await rt.backend.terminate(machine.id)
        log.warning("untagged machine of this control plane terminated", machine_id=machine.id)
        return True
    async with exclusive(rt.engine, instance_id) as held:
        if not held:
            return False
        # Look again now that no handler can be acting on it.
        async with rt.sessions() as session:
            row = await session.get(Instance, instance_id)
            if row is not None and not _is_orphan(machine, row):
                return False
        await rt.backend.terminate(machine.id)
    log.warning("orphan machine terminated", machine_id=machine.id, instance_id=str(instance_id))
    return True


async def _record_drift(rt: Runtime, instance_id: uuid.UUID, machine: Machine) -> bool:
    async with exclusive(rt.engine, instance_id) as held:
        if not held:
            return False
        current = await rt.backend.describe(machine.id)
        if current is None or current.state is not MachineState.STOPPED:
            return False
        async with locked(rt, instance_id) as tx:
            if not tx.is_in(S.RUNNING):
                return False
            # The row goes the way a stop would have taken it.
            await tx.move(STOP.requests, DRIFTED)
            await tx.move(STOP.drives_to, DRIFTED)
    log.warning("machine stopped outside CloudBot", instance_id=str(instance_id))
    return True


async def _end_if_vanished(rt: Runtime, instance_id: uuid.UUID, machine_id: str) -> bool:
    async with exclusive(rt.engine, instance_id) as held:
        if not held:
            return False
        # Listings can lag; only a direct look decides that a machine is gone.
        machine = await rt.backend.describe(machine_id)
        if machine is not None and machine.state is not MachineState.GONE:
            return False
        async with locked(rt, instance_id) as tx:
            if (
                tx.instance is None
                or not tx.is_in(S.RUNNING, S.STOPPED)
                or tx.instance.backend_instance_id != machine_id
            ):
                return False
            await tx.end_vanished()
    log.warning("machine vanished", instance_id=str(instance_id), machine_id=machine_id)
    return True


async def _redrive_stuck(rt: Runtime) -> int:
    cutoff = datetime.now(UTC) - timedelta(seconds=rt.settings.transition_timeout_seconds)
    async with rt.sessions() as session:
        stuck = [i.id for i in await repository.stuck_instances(session, rt.backend.name, cutoff)]
    redriven = 0
    for instance_id in stuck:
        async with unit_of_work(rt.sessions) as session:
            instance = await lock_instance(session, instance_id)
            driving = LIFECYCLE.driving(instance.state) if instance is not None else None
            if (
                instance is None
                or driving is None
                or instance.state_changed_at >= cutoff
                or await repository.open_command_exists(session, instance_id)
            ):
                continue
            command = add_command(session, driving, instance_id, None)
        # Committed: if this send is lost, the outbox relay sends it.
        try:
            await publish(rt.celery, rt.sessions, command)
        except Exception:
            log.warning("could not publish a re-driven command", exc_info=True)
            continue
        log.warning("stuck instance driven again", instance_id=str(instance_id))
        redriven += 1
    return redriven
