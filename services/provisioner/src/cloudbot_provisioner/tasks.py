"""Celery tasks: thin wrappers that run a handler on the process's event loop and decide
what happens next: done, look again later (the machine is settling), retry with backoff
(throttling, 5xx, no capacity), or give up and mark the instance failed.

There is one task per command of the lifecycle table (`cloudbot_common.lifecycle`), named
by its task name and registered by `register_commands`. Task arguments are ids only.
"""

from __future__ import annotations

import random
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import asdict
from typing import Any, TypeVar, cast

import structlog
from celery import Celery

from cloudbot_common.db import unit_of_work
from cloudbot_common.lifecycle import Command
from cloudbot_common.logging import get_logger
from cloudbot_provisioner import idle, outbox_relay, reconciler, repository, webhook_delivery
from cloudbot_provisioner.celery_app import (
    IDLE_SWEEP_TASK,
    RECONCILE_TASK,
    RELAY_TASK,
    WEBHOOK_DELIVER_TASK,
    WEBHOOK_RELAY_TASK,
    app,
    settings,
)
from cloudbot_provisioner.errors import PermanentError, TransientError
from cloudbot_provisioner.instances import steps
from cloudbot_provisioner.instances.handlers import DISPATCH
from cloudbot_provisioner.instances.steps import Handler
from cloudbot_provisioner.runtime import Runtime, get_runtime

log = get_logger(__name__)
F = TypeVar("F", bound=Callable[..., Any])


def _task(name: str, celery: Celery = app, **options: Any) -> Callable[[F], F]:
    """`celery.task`, typed (Celery ships no type information)."""
    return cast(Callable[[F], F], celery.task(name=name, **options))


def _runtime() -> Runtime:
    return get_runtime(settings, app)


def backoff_seconds(attempt: int, cap: float) -> float:
    """Exponential backoff with jitter: about 1, 2, 4, ... seconds, at most `cap`, spread
    so that many instances throttled together do not all come back together."""
    ceiling = min(float(cap), 2.0**attempt)
    return random.uniform(ceiling / 2, ceiling)  # noqa: S311 - jitter, not a secret


async def _requeued(rt: Runtime, command_id: uuid.UUID, seconds: float) -> None:
    async with unit_of_work(rt.sessions) as session:
        await repository.command_requeued(session, command_id, seconds)


async def _failed_attempt(rt: Runtime, command_id: uuid.UUID) -> int:
    async with unit_of_work(rt.sessions) as session:
        return await repository.record_failed_attempt(session, command_id)


def _run_command(
    task: Any,
    command: Command,
    handler: Handler,
    instance_id: str,
    command_id: str,
    waiting_since: float | None,
) -> str | None:
    rt = _runtime()
    iid, cid = uuid.UUID(instance_id), uuid.UUID(command_id)
    # The API request's id travels as a message header (`send_command`), so this task's
    # lines, and the EC2 calls it makes, carry the id of the request that caused them.
    request_id: str | None = getattr(task.request, "request_id", None)
    structlog.contextvars.bind_contextvars(
        instance_id=instance_id, command_id=command_id, command=command.verb
    )
    if request_id:
        structlog.contextvars.bind_contextvars(request_id=request_id)
    try:
        try:
            outcome = rt.run(steps.run(rt, handler, iid, cid, waiting_since))
        except PermanentError as e:
            rt.run(steps.give_up(rt, command, iid, cid, e.reason))
            return None
        except TransientError as e:
            _retry_or_give_up(task, rt, command, iid, cid, e.reason, e)
            return None
        except Exception as e:
            # Unknown errors (the database away, a bug) get the same bounded retries.
            log.exception("command step failed unexpectedly")
            error = type(e).__name__
            reason = f"Could not {command.verb} the machine: an internal error ({error})."
            _retry_or_give_up(task, rt, command, iid, cid, reason, e)
            return None
        attempt = int(task.request.retries or 0) + 1
        if isinstance(outcome, steps.Wait):
            # Look again later without holding this worker slot meanwhile.
            rt.run(_requeued(rt, cid, outcome.seconds))
            task.apply_async(
                kwargs={
                    "instance_id": instance_id,
                    "command_id": command_id,
                    "waiting_since": outcome.since,
                },
                countdown=outcome.seconds,
                task_id=command_id,
                headers={"request_id": request_id} if request_id else None,
                # Counted as a retry of the one task, so Flower shows the attempts.
                retries=attempt,
            )
            return None
        return _done(attempt, waiting_since)
    finally:
        structlog.contextvars.clear_contextvars()


def _done(attempts: int, waiting_since: float | None) -> str:
    """The command's result as Flower shows it: the whole wait for the machine and the
    attempts it took (Flower's runtime column is the last attempt's alone)."""
    if waiting_since is None:
        return "done at the first attempt"
    return f"done after {time.time() - waiting_since:.1f} s of waiting and {attempts} attempts"


def _retry_or_give_up(
    task: Any,
    rt: Runtime,
    command: Command,
    instance_id: uuid.UUID,
    command_id: uuid.UUID,
    reason: str,
    exc: Exception,
) -> None:
    failures = rt.run(_failed_attempt(rt, command_id))
    limit = rt.settings.task_max_retries
    if failures > limit:
        final = f"{reason} Gave up after {failures} attempts."
        rt.run(steps.give_up(rt, command, instance_id, command_id, final))
        return
    countdown = backoff_seconds(failures - 1, rt.settings.task_retry_backoff_max_seconds)
    log.warning("command step will be retried", reason=reason, attempt=failures)
    rt.run(_requeued(rt, command_id, countdown))
    # The bound is kept in the database (`failures`), not by Celery's per-message count.
    raise task.retry(countdown=countdown, exc=exc, max_retries=None)


def register_commands(celery: Celery, dispatch: Mapping[Command, Handler]) -> dict[str, Any]:
    """One task per command, named by the command's task name, running its handler; the
    tasks by name. acks_late and reject_on_worker_lost are set app-wide by `make_celery`."""
    return {
        command.task: _command_task(celery, command, handler)
        for command, handler in dispatch.items()
    }


def _command_task(celery: Celery, command: Command, handler: Handler) -> Any:
    def run(
        self: Any, instance_id: str, command_id: str, waiting_since: float | None = None
    ) -> str | None:
        return _run_command(self, command, handler, instance_id, command_id, waiting_since)

    run.__name__ = run.__qualname__ = command.verb
    return _task(command.task, celery, bind=True, ignore_result=True)(run)


COMMAND_TASKS = register_commands(app, DISPATCH)

# Periodic housekeeping sends no monitoring events: Flower lists the commands people asked
# for, not a relay tick every few seconds (beat sends no task-sent events either).
_HOUSEKEEPING: dict[str, Any] = {"ignore_result": True, "send_events": False}


@_task(RELAY_TASK, **_HOUSEKEEPING)
def relay_outbox() -> int:
    rt = _runtime()
    return rt.run(outbox_relay.relay(rt))


@_task(RECONCILE_TASK, **_HOUSEKEEPING)
def reconcile() -> dict[str, int]:
    rt = _runtime()
    try:
        return asdict(rt.run(reconciler.reconcile(rt)))
    except (TransientError, PermanentError) as e:
        # The next run tries again; nothing is lost by skipping this one.
        log.warning("reconciliation skipped", reason=e.reason)
        return {}


@_task(WEBHOOK_RELAY_TASK, **_HOUSEKEEPING)
def relay_webhooks() -> int:
    """Hand each (webhook, machine) pair with a delivery due to a worker."""
    rt = _runtime()
    pairs = rt.run(webhook_delivery.due_pairs(rt))
    for webhook_id, instance_id in pairs:
        app.send_task(
            WEBHOOK_DELIVER_TASK,
            kwargs={
                "webhook_id": str(webhook_id),
                "instance_id": str(instance_id) if instance_id else None,
            },
            # A pair's next relay sends it again if this one waited too long.
            expires=max(rt.settings.webhook_relay_seconds * 5, 10),
        )
    return len(pairs)


@_task(WEBHOOK_DELIVER_TASK, ignore_result=True)
def deliver_webhooks(webhook_id: str, instance_id: str | None) -> int:
    """Send one pair's due deliveries in order (their retries are counted in Postgres)."""
    rt = _runtime()
    iid = uuid.UUID(instance_id) if instance_id else None
    return rt.run(webhook_delivery.deliver_pair(rt, uuid.UUID(webhook_id), iid))


@_task(IDLE_SWEEP_TASK, **_HOUSEKEEPING)
def idle_sweep() -> dict[str, int]:
    """Warn about, then stop, machines nobody has used for their idle time."""
    rt = _runtime()
    return asdict(rt.run(idle.sweep(rt)))
