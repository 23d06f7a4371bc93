"""A producer-only Celery app with the control plane's settings, for `celery -A` in tests
that need Flower (or another monitor) without the provisioner's tasks."""

from __future__ import annotations

from cloudbot_common.commands import make_celery
from cloudbot_common.settings import get_settings

app = make_celery(get_settings(), "cloudbot-ops-test")
