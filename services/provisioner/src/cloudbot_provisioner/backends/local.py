"""Machines as local desktop sandboxes, for LOCAL_DEV_MODE (no AWS account needed).

Each machine is a directory under LOCAL_STATE_DIR named by its instance id, holding its
spec (ports, name), its disk and its logs, and a detached process tree started by
`local_machine`: a bubblewrap sandbox running Xvfb, x11vnc, a terminal and the agent,
reachable only through the gate's two ports on 127.0.0.1. The directory is the machine:
it survives a provisioner restart, `stop` ends the processes and keeps it, `terminate`
removes it.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cloudbot_common import instance_contract as contract
from cloudbot_common import procfs
from cloudbot_common.security.gate import connect_through_gate
from cloudbot_common.security.instance_identity import sign_local_identity
from cloudbot_common.security.opaque import agent_credential
from cloudbot_common.settings import Settings
from cloudbot_provisioner.backends.base import LaunchSpec, Machine, MachineState
from cloudbot_provisioner.errors import PermanentError, TransientError
from cloudbot_provisioner.machine.agent import write_private
from cloudbot_provisioner.machine.local_machine import MACHINE_FILE, PID_FILE, SECRETS_FILE

HOST = "127.0.0.1"
_ID_PREFIX = "local-"
_PORTS_LOCK = ".ports.lock"
# Held while a machine boots, halts or is removed: two workers given the same command (a
# redelivered message while the first is still at it) must not boot one machine twice.
_MACHINE_LOCK = ".lock"
# The gate's two ports on the host: what the gateway connects to (the desktop's VNC server
# and the agent's WebSocket listen inside the sandbox's own network).
_PORT_KEYS = ("vnc_port", "agent_port")
# Programs a local desktop needs, and the Debian packages that provide them.
REQUIRED_PROGRAMS = {
    "Xvfb": "xvfb",
    "x11vnc": "x11vnc",
    "xterm": "xterm",
    "xsetroot": "x11-xserver-utils",
    "bwrap": "bubblewrap",  # the sandbox every local desktop runs in
}


def missing_programs() -> list[str]:
    """Debian packages to install before local desktops can run."""
    return sorted({pkg for prog, pkg in REQUIRED_PROGRAMS.items() if shutil.which(prog) is None})


def machine_id_of(instance_id: uuid.UUID | str) -> str:
    return f"{_ID_PREFIX}{instance_id}"


def _tree(pid: int) -> list[int]:
    """`pid` and all its descendants, as they are now."""
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo.extend(procfs.children(current))
    return found


def _is_machine_process(pid: int, directory: Path) -> bool:
    """Guards against a recycled pid: the process must be this directory's init."""
    cmdline = procfs.cmdline(pid)
    return (
        cmdline is not None
        and b"cloudbot_provisioner.machine.local_machine" in cmdline
        and any(arg.decode(errors="replace") == str(directory) for arg in cmdline)
    )


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((HOST, port))
        except OSError:
            return False
    return True


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Serialises port allocation between worker processes (and provisioner replicas)."""
    with path.open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


class LocalBackend:
    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._root = Path(settings.local_state_dir).resolve()

    @property
    def name(self) -> str:
        return "local"

    async def aclose(self) -> None:
        return None

    # --- Backend API (blocking work runs in threads) -----------------------------------

    async def find(self, instance_id: uuid.UUID) -> list[Machine]:
        machine = await self.describe(machine_id_of(instance_id))
        return [machine] if machine is not None and machine.state is not MachineState.GONE else []

    async def describe(self, machine_id: str) -> Machine | None:
        directory = self._dir(machine_id)
        spec = await asyncio.to_thread(self._read_spec, directory)
        if spec is None or not spec.get("launched_at"):
            return None
        pid = await asyncio.to_thread(self._running_pid, directory)
        key = self._agent_key(uuid.UUID(spec["instance_id"]))
        if pid is None:
            state = MachineState.STOPPED
        elif await _desktop_greets(spec["vnc_port"], key) and await _gate_admits(
            spec["agent_port"], key
        ):
            state = MachineState.RUNNING
        else:
            state = MachineState.PENDING
        return _machine(spec, state)

    async def launch(self, spec: LaunchSpec) -> Machine:
        machine_id = machine_id_of(spec.instance_id)
        directory = self._dir(machine_id)
        record = await asyncio.to_thread(self._prepare, directory, spec)
        if not record.get("launched_at"):
            # A launch that booted but died before recording it must not boot a second
            # desktop on the same ports.
            await asyncio.to_thread(self._boot_unless_running, directory, spec.bootstrap_token)
            record = await asyncio.to_thread(self._mark_launched, directory)
        return _machine(record, MachineState.PENDING)

    async def stop(self, machine_id: str) -> None:
        await asyncio.to_thread(self._halt_locked, self._dir(machine_id))

    async def start(self, machine_id: str) -> None:
        directory = self._dir(machine_id)
        if await asyncio.to_thread(self._read_spec, directory) is None:
            raise PermanentError("Could not start the machine: its local directory is gone.")
        await asyncio.to_thread(self._boot_unless_running, directory, None)

    async def terminate(self, machine_id: str) -> None:
        await asyncio.to_thread(self._remove, self._dir(machine_id))

    async def list_ours(self) -> list[Machine]:
        names = await asyncio.to_thread(self._list_dirs)
        machines = []
        for name in names:
            machine = await self.describe(machine_id_of(name))
            if machine is not None and machine.state is not MachineState.GONE:
                machines.append(machine)
        return machines

    def _agent_key(self, instance_id: uuid.UUID) -> str:
        """The instance's agent credential: what the gateway proves to the machine's gate."""
        return agent_credential(self._settings.agent_token_secret.get_secret_value(), instance_id)

    # --- On disk -------------------------------------------------------------------------

    def _dir(self, machine_id: str) -> Path:
        if not machine_id.startswith(_ID_PREFIX):
            raise PermanentError(f"{machine_id!r} is not a local machine id.")
        # Parsing as a UUID also keeps the path inside the state directory.
        return self._root / str(uuid.UUID(machine_id.removeprefix(_ID_PREFIX)))

    @staticmethod
    def _read_spec(directory: Path) -> dict[str, Any] | None:
        try:
            data = json.loads((directory / MACHINE_FILE).read_text())
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    @staticmethod
    def _write_spec(directory: Path, record: dict[str, Any]) -> None:
        write_private(directory / MACHINE_FILE, json.dumps(record, indent=2))

    def _list_dirs(self) -> list[str]:
        if not self._root.exists():
            return []
        names = []
        for entry in self._root.iterdir():
            spec = self._read_spec(entry)
            if spec is not None and spec.get("control_plane_id") == self._settings.control_plane_id:
                names.append(entry.name)
        return names

    def _prepare(self, directory: Path, spec: LaunchSpec) -> dict[str, Any]:
        """The machine's record, with two ports of its own, written once."""
        self._root.mkdir(parents=True, exist_ok=True)
        with _locked(self._root / _PORTS_LOCK):
            existing = self._read_spec(directory)
            if existing is not None:
                return existing
            used: set[int] = set()
            for entry in self._root.iterdir():
                other = self._read_spec(entry)
                if other is not None:
                    used.update(int(other[key]) for key in _PORT_KEYS if key in other)
            ports: list[int] = []
            port = self._settings.local_port_range_start
            while len(ports) < len(_PORT_KEYS):
                if port > 65535:
                    raise PermanentError("Could not launch the machine: no free local ports.")
                if port not in used and _bindable(port):
                    ports.append(port)
                port += 1
            directory.mkdir(mode=0o700, exist_ok=True)
            record = {
                "machine_id": machine_id_of(spec.instance_id),
                "instance_id": str(spec.instance_id),
                "owner_id": str(spec.owner_id),
                "name": spec.name,
                "control_plane_id": self._settings.control_plane_id,
                **dict(zip(_PORT_KEYS, ports, strict=True)),
                "api_url": self._settings.public_api_url.rstrip("/"),
                "agent_ws_path": contract.AGENT_WS_PATH,
                "bootstrap_path": contract.BOOTSTRAP_PATH,
                "heartbeat_path": contract.HEARTBEAT_PATH,
                "created_at": datetime.now(UTC).isoformat(),
                "launched_at": None,
            }
            self._write_spec(directory, record)
            return record

    def _mark_launched(self, directory: Path) -> dict[str, Any]:
        record = self._read_spec(directory) or {}
        record["launched_at"] = datetime.now(UTC).isoformat()
        self._write_spec(directory, record)
        return record

    def _running_pid(self, directory: Path) -> int | None:
        try:
            pid = int((directory / PID_FILE).read_text().strip())
        except (OSError, ValueError):
            return None
        return pid if procfs.alive(pid) and _is_machine_process(pid, directory) else None

    def _boot_unless_running(self, directory: Path, bootstrap_token: str | None) -> None:
        with _locked(directory / _MACHINE_LOCK):
            if self._running_pid(directory) is None:
                self._boot(directory, bootstrap_token)

    def _halt_locked(self, directory: Path) -> None:
        if directory.is_dir():
            with _locked(directory / _MACHINE_LOCK):
                self._halt(directory)

    def _remove(self, directory: Path) -> None:
        if directory.is_dir():
            with _locked(directory / _MACHINE_LOCK):
                self._halt(directory)
                shutil.rmtree(directory, ignore_errors=True)

    def _boot(self, directory: Path, bootstrap_token: str | None) -> None:
        """Starts the machine's init, detached; returns once it has recorded its pid."""
        missing = missing_programs()
        if missing:
            raise PermanentError(
                "Local desktops need programs this host lacks; install them with "
                f"`apt-get install {' '.join(missing)}`."
            )
        instance_id = uuid.UUID(directory.name)
        env = {k: os.environ[k] for k in ("PATH", "LANG", "LC_ALL", "TZ") if k in os.environ}
        # Tokens go in a private file the machine's init reads and deletes, not in the
        # environment (readable in /proc). The agent credential is the one the gateway will
        # present; a real machine learns it at bootstrap.
        # With the bootstrap token, the proof of which machine this is: signed here, on the
        # host, with a key the sandbox can neither read nor derive (a local stand-in for
        # EC2's instance identity document).
        document, signature = sign_local_identity(
            self._settings.agent_token_secret.get_secret_value(),
            str(instance_id),
            machine_id_of(instance_id),
        )
        secrets = {
            "agent_token": self._agent_key(instance_id),
            "bootstrap_token": bootstrap_token,
            "identity": {"document": document, "signature": signature},
        }
        write_private(directory / SECRETS_FILE, json.dumps(secrets))
        try:
            subprocess.run(  # noqa: S603 - our own module, no user input on the command line
                [
                    sys.executable,
                    "-m",
                    "cloudbot_provisioner.machine.local_machine",
                    "--daemon",
                    str(directory),
                ],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                check=True,
                timeout=30,
            )
        except (OSError, subprocess.SubprocessError) as e:
            raise TransientError(f"Could not start the local machine ({type(e).__name__}).") from e

    def _halt(self, directory: Path) -> None:
        """Ends the machine's whole process group and every process of it elsewhere: TERM,
        a short grace, then KILL. Call with the machine's lock held."""
        try:
            pgid: int | None = int((directory / PID_FILE).read_text().strip())
        except (OSError, ValueError):
            pgid = None
        if pgid is not None and procfs.alive(pgid) and not _is_machine_process(pgid, directory):
            # The recorded leader's pid now belongs to some other process: its group is
            # not ours to signal.
            pgid = None
        # The init and its sandbox name the directory on their command lines, so one whose
        # pid file was lost (a crash between writing it and starting) is found all the same.
        roots = {*procfs.naming(str(directory)), *([pgid] if pgid is not None else [])}

        # The group, and every descendant: inside the sandbox some programs (Xvfb) make
        # process groups of their own, which a signal to the group would miss.
        def lingering() -> list[int]:
            group = procfs.group_members(pgid) if pgid is not None else []
            return [p for p in {*group, *tree} if procfs.alive(p)]

        tree = {pid for root in roots for pid in _tree(root)}
        for sig, grace in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
            if not lingering():
                break
            if pgid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pgid, sig)
            for pid in lingering():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            deadline = time.monotonic() + grace
            while lingering() and time.monotonic() < deadline:
                time.sleep(0.05)
        if lingering():
            raise TransientError("Could not stop the local machine: its processes linger.")
        with contextlib.suppress(OSError):
            (directory / PID_FILE).unlink()


def _machine(record: dict[str, Any], state: MachineState) -> Machine:
    launched = record.get("launched_at")
    return Machine(
        id=str(record["machine_id"]),
        state=state,
        instance_id=str(record["instance_id"]),
        host=HOST,
        vnc_port=int(record["vnc_port"]),
        agent_port=int(record["agent_port"]),
        launched_at=datetime.fromisoformat(launched) if launched else None,
    )


async def _gate_admits(port: int, key: str) -> bool:
    try:
        sock = await asyncio.wait_for(connect_through_gate(HOST, port, key), 2)
    except (OSError, TimeoutError):
        return False
    sock.close()
    return True


async def _desktop_greets(port: int, key: str) -> bool:
    """Ready means the VNC server, past the machine's gate, answers with its RFB greeting."""
    try:
        sock = await asyncio.wait_for(connect_through_gate(HOST, port, key), 2)
    except (OSError, TimeoutError):
        return False
    try:
        greeting = await asyncio.wait_for(asyncio.get_running_loop().sock_recv(sock, 12), 2)
        return greeting.startswith(b"RFB ")
    except (OSError, TimeoutError):
        return False
    finally:
        sock.close()
