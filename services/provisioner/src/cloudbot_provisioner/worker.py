"""Entry point for Celery: `celery -A cloudbot_provisioner.worker worker -Q provisioning`
and `celery -A cloudbot_provisioner.worker beat` (exactly one beat per deployment)."""

from __future__ import annotations

from cloudbot_provisioner import tasks as _tasks  # noqa: F401 - registers the tasks
from cloudbot_provisioner.celery_app import app

__all__ = ["app"]
