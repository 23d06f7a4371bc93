"""The provisioner's Celery worker with a backend whose machines are running the moment
they are launched, so that a lifecycle benchmark measures the control plane alone (the
cloud's own time excluded).

    python -m bench.instant_worker STATE_DIR [celery worker options]

Machines are files under STATE_DIR, shared by every worker process; each launch is also
appended to STATE_DIR/launches, for the benchmark to check that no instance was launched
twice and none was left out.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import uuid
from datetime import UTC, datetime
from pathlib import Path

from cloudbot_common.settings import Settings
from cloudbot_provisioner import runtime
from cloudbot_provisioner.backends.base import Backend, LaunchSpec, Machine, MachineState


class InstantBackend:
    """Serves `local` instances (what the API creates in LOCAL_DEV_MODE), at once."""

    name = "local"

    def __init__(self, state_dir: Path) -> None:
        self._dir = state_dir

    def _path(self, machine_id: str) -> Path:
        return self._dir / f"{machine_id}.json"

    def _write(self, machine: Machine) -> None:
        record = {"id": machine.id, "state": machine.state.value, "instance": machine.instance_id}
        self._path(machine.id).write_text(json.dumps(record))

    def _read(self, machine_id: str) -> Machine | None:
        try:
            record = json.loads(self._path(machine_id).read_text())
        except FileNotFoundError:
            return None
        return Machine(
            id=record["id"], state=MachineState(record["state"]),
            instance_id=record["instance"], host="127.0.0.1", vnc_port=5900, agent_port=8765,
            launched_at=datetime.now(UTC),
        )  # fmt: skip

    async def find(self, instance_id: uuid.UUID) -> list[Machine]:
        machine = self._read(f"m-{instance_id}")
        return [machine] if machine and machine.state is not MachineState.GONE else []

    async def describe(self, machine_id: str) -> Machine | None:
        return self._read(machine_id)

    async def launch(self, spec: LaunchSpec) -> Machine:
        with (self._dir / "launches").open("a") as log:
            log.write(f"{spec.instance_id}\n")
        machine = Machine(
            id=f"m-{spec.instance_id}", state=MachineState.RUNNING,
            instance_id=str(spec.instance_id), host="127.0.0.1", vnc_port=5900,
            agent_port=8765, launched_at=datetime.now(UTC),
        )  # fmt: skip
        self._write(machine)
        return machine

    async def _move(self, machine_id: str, state: MachineState) -> None:
        machine = self._read(machine_id)
        if machine is not None:
            self._write(dataclasses.replace(machine, state=state))

    async def stop(self, machine_id: str) -> None:
        await self._move(machine_id, MachineState.STOPPED)

    async def start(self, machine_id: str) -> None:
        await self._move(machine_id, MachineState.RUNNING)

    async def terminate(self, machine_id: str) -> None:
        await self._move(machine_id, MachineState.GONE)

    async def list_ours(self) -> list[Machine]:
        return []

    async def aclose(self) -> None:
        return None


def main() -> None:
    state_dir = Path(sys.argv[1])
    state_dir.mkdir(parents=True, exist_ok=True)

    async def open_backend(settings: Settings) -> Backend:
        return InstantBackend(state_dir)

    # Replaced before Celery forks its worker processes, which open their runtime after.
    runtime.open_backend = open_backend  # type: ignore[attr-defined]
    from celery.bin.celery import main as celery_main

    sys.argv = ["celery", "--app=cloudbot_provisioner.worker", "worker", *sys.argv[2:]]
    os.environ.setdefault("ENVIRONMENT", "test")
    celery_main()


if __name__ == "__main__":
    main()
