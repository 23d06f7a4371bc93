"""What the provisioner needs from a place that runs machines (EC2, or local sandboxes)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Protocol


class MachineState(StrEnum):
    """A machine's state as its backend reports it, reduced to what decisions need."""

    PENDING = "pending"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"
    # Terminated or on its way there: as good as gone.
    GONE = "gone"


@dataclass(frozen=True, slots=True)
class Machine:
    id: str
    state: MachineState
    # The instance id the machine is tagged with (None: not one of ours).
    instance_id: str | None
    # Where the gateway reaches the desktop and the agent; None until the backend knows.
    host: str | None
    vnc_port: int
    agent_port: int
    launched_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class LaunchSpec:
    instance_id: uuid.UUID
    owner_id: uuid.UUID
    name: str
    instance_type: str
    # Goes into the machine's boot configuration only; never logged, never a task argument.
    bootstrap_token: str = field(repr=False)


class Backend(Protocol):
    """A place that runs machines. Calls raise `TransientError` or `PermanentError`."""

    @property
    def name(self) -> str:
        """The value of `Instance.backend` this backend serves."""
        ...

    async def find(self, instance_id: uuid.UUID) -> list[Machine]:
        """Machines carrying this instance's tag that are not gone, oldest first."""
        ...

    async def describe(self, machine_id: str) -> Machine | None:
        """The machine, or None when it no longer exists."""
        ...

    async def launch(self, spec: LaunchSpec) -> Machine: ...

    async def stop(self, machine_id: str) -> None: ...

    async def start(self, machine_id: str) -> None: ...

    async def terminate(self, machine_id: str) -> None:
        """Ends the machine and its disk. A machine that is already gone is no error."""
        ...

    async def list_ours(self) -> list[Machine]:
        """Every machine tagged with this control plane's id that is not gone."""
        ...

    async def aclose(self) -> None: ...
