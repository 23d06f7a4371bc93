"""The outbox relay: republish commands that were written but never picked up.

The API publishes each command right after its commit; this catches the ones lost in
between (Redis down, the API killed) and the ones whose message died with a worker.
Handlers are idempotent, so a command published twice does its work once.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

from cloudbot_common.commands import mark_published, send_command
from cloudbot_common.db import unit_of_work
from cloudbot_common.logging import get_logger
from cloudbot_provisioner import repository
from cloudbot_provisioner.runtime import Runtime

log = get_logger(__name__)

BATCH = 100


async def relay(rt: Runtime) -> int:
    """Republish due commands; returns how many were sent."""
    cutoff = datetime.now(UTC) - timedelta(seconds=rt.settings.outbox_relay_after_seconds)
    sent = []
    async with unit_of_work(rt.sessions) as session:
        for command in await repository.due_commands(session, cutoff, BATCH):
            try:
                await asyncio.to_thread(send_command, rt.celery, command)
            except Exception:
                # The broker is away: the rest waits for the next run.
                log.warning("outbox relay could not publish", exc_info=True)
                break
            sent.append(command.id)
        await mark_published(session, sent)
    if sent:
        log.info("outbox commands republished", count=len(sent))
    return len(sent)
