"""How a failed step is treated: try again later, or give up and say why.

Backends translate their own exceptions into these two, so the task layer decides on
retries without knowing anything about EC2 or local processes.
"""

from __future__ import annotations


class ProvisionerError(Exception):
    """A failed step with a message a person can read (shown as the instance's reason)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class TransientError(ProvisionerError):
    """Likely to heal by itself: throttling, a 5xx, no capacity right now, a lost connection."""


class PermanentError(ProvisionerError):
    """Will not heal by retrying: a bad AMI, missing permissions, a quota, a broken request."""
