"""The provisioner's Celery app: configuration, beat schedule and process hooks.

Settings are read here because Celery needs its broker and schedule at import; engines,
clients and the event loop are made per worker process in `worker_process_init`.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from celery.signals import (
    beat_init,
    setup_logging,
    worker_process_init,
    worker_process_shutdown,
)

from cloudbot_common.commands import make_celery
from cloudbot_common.logging import configure_logging
from cloudbot_common.settings import get_settings
from cloudbot_provisioner.runtime import close_runtime, open_runtime

RELAY_TASK = "cloudbot.provisioner.relay_outbox"
RECONCILE_TASK = "cloudbot.provisioner.reconcile"
WEBHOOK_RELAY_TASK = "cloudbot.webhooks.relay"
WEBHOOK_DELIVER_TASK = "cloudbot.webhooks.deliver"
IDLE_SWEEP_TASK = "cloudbot.instances.idle_sweep"

settings = get_settings()
app = make_celery(settings, "cloudbot_provisioner")

_relay_every = max(1.0, settings.outbox_relay_after_seconds / 3)
_reconcile_every = float(max(1, settings.reconcile_interval_seconds))
app.conf.update(
    include=["cloudbot_provisioner.tasks"],
    worker_hijack_root_logger=False,
    # Opening the backend (botocore loads the EC2 model) can outlast Celery's 4 s default.
    worker_proc_alive_timeout=30,
    # Exactly one beat schedules, however many run (a Redis lock; see beat.py).
    beat_scheduler="cloudbot_provisioner.beat:SingleBeatScheduler",
    beat_schedule_filename=str(
        Path(tempfile.gettempdir()) / f"cloudbot-beat-{settings.control_plane_id}"
    ),
    beat_schedule={
        "outbox-relay": {
            "task": RELAY_TASK,
            "schedule": _relay_every,
            # A run that waited longer than its period is superseded by the next one.
            "options": {"expires": _relay_every},
        },
        "reconcile": {
            "task": RECONCILE_TASK,
            "schedule": _reconcile_every,
            "options": {"expires": _reconcile_every},
        },
        "idle-sweep": {
            "task": IDLE_SWEEP_TASK,
            "schedule": settings.idle_sweep_seconds,
            "options": {"expires": settings.idle_sweep_seconds},
        },
        "webhook-relay": {
            "task": WEBHOOK_RELAY_TASK,
            "schedule": settings.webhook_relay_seconds,
            "options": {"expires": settings.webhook_relay_seconds},
        },
    },
)


def _configure_logging(**_: Any) -> None:
    # Celery's own lines go through the same redacting pipeline as ours.
    configure_logging("provisioner", level=settings.log_level, json_output=settings.log_json)


def _open_runtime(**_: Any) -> None:
    open_runtime(settings, app)


def _close_runtime(**_: Any) -> None:
    close_runtime()


def _quiet_beat(**_: Any) -> None:
    # Beat sends only periodic housekeeping, whose tasks send no events (tasks.py): no
    # task-sent event either, so Flower's list stays the commands people asked for.
    app.conf.task_send_sent_event = False


setup_logging.connect(_configure_logging, weak=False)
beat_init.connect(_quiet_beat, weak=False)
worker_process_init.connect(_open_runtime, weak=False)
worker_process_shutdown.connect(_close_runtime, weak=False)
