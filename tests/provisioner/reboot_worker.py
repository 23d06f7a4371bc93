"""The provisioner's Celery app with the tasks of the extended table (`reboot.EXTENDED`):
`celery --app=tests.provisioner.reboot_worker worker`. Only a worker process started
for that imports this."""

from __future__ import annotations

from cloudbot_provisioner.instances.handlers import DISPATCH
from cloudbot_provisioner.instances.steps import dispatch
from cloudbot_provisioner.tasks import register_commands
from cloudbot_provisioner.worker import app
from tests.provisioner.reboot import EXTENDED, HANDLERS

# The four commands are registered already; the table's new ones join them.
ADDED = register_commands(
    app, {c: h for c, h in dispatch(EXTENDED, HANDLERS).items() if c not in DISPATCH}
)

__all__ = ["app"]
