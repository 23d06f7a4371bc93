"""Flower settings for watching the provisioner's queue.

Used as `celery -A cloudbot_provisioner.worker flower --conf=deploy/flowerconfig.py`
(`make dev`) and baked into the provisioner image as /app/flowerconfig.py (compose).
Flower executes this file and takes every module-level name that is one of its options.

The login comes from FLOWER_USER and FLOWER_PASSWORD through the shared settings, so it
is never on a command line (where `ps` shows it) and ENVIRONMENT=production refuses the
development password. Flower never runs without it.
"""

from __future__ import annotations

import ast
import logging as _logging
from typing import Any

from cloudbot_common.logging import configure_logging, redact_processor
from cloudbot_common.settings import get_settings as _get_settings

_settings = _get_settings()

# Flower's lines go through the same pipeline as every other service (JSON when LOG_JSON,
# redacted), instead of tornado's own console format.
logging = "none"
configure_logging("flower", level=_settings.log_level, json_output=_settings.log_json)
# Flower asks the workers for their state as it starts, usually before they are up: a
# warning per question it could not get answered is start-up noise.
_logging.getLogger("flower.inspector").setLevel(_logging.ERROR)

basic_auth = [f"{_settings.flower_user}:{_settings.flower_password.get_secret_value()}"]
# Flower alone would listen on every interface; compose passes --address=0.0.0.0 inside
# its container. The port is 5555 unless FLOWER_PORT or --port says otherwise.
address = "127.0.0.1"
# Monitoring only: no pool resizing, shutdowns or rate-limit changes from the web page.
read_only = True
# What an operator wants to see of a command: its name, the instance it acts on, and how
# it went (the result says how long it waited for its machine, over how many attempts;
# the runtime is the last attempt's).
tasks_columns = "name,kwargs,state,result,received,started,runtime,retries,worker,uuid"
max_tasks = 20000
purge_offline_workers = 3600


def _shown(kwargs: Any) -> Any:
    try:
        parsed = ast.literal_eval(kwargs) if isinstance(kwargs, str) else kwargs
    except (ValueError, SyntaxError):
        return "[hidden]"
    if not isinstance(parsed, dict):
        return "[hidden]"
    return repr(dict(redact_processor(None, "", dict(parsed))))


def format_task(task: Any) -> Any:
    """Flower's hook for the task pages. Provisioning tasks carry ids only; should one ever
    carry more, the same redaction as the logs applies here (secret-named arguments and
    token-shaped text are hidden), and positional arguments are not shown at all."""
    if getattr(task, "kwargs", None) is not None:
        task.kwargs = _shown(task.kwargs)
    if getattr(task, "args", None) not in (None, "()", "[]"):
        task.args = "[hidden]"
    return task
