"""Where machines run: EC2, or local desktop sandboxes in LOCAL_DEV_MODE.

Kept free of imports at package level: a backend pulls in only what it drives (the local
backend must not pay for aiobotocore).
"""

from __future__ import annotations

from cloudbot_common.settings import Settings
from cloudbot_provisioner.backends.base import Backend


async def open_backend(settings: Settings) -> Backend:
    """The backend this provisioner drives, made once per worker process."""
    if settings.local_dev_mode:
        from cloudbot_provisioner.backends.local import LocalBackend

        return LocalBackend(settings)
    from cloudbot_provisioner.backends.ec2 import Ec2Backend

    return await Ec2Backend.open(settings)
