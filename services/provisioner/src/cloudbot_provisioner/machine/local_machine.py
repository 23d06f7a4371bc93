"""One local sandbox machine: its init process, which runs the desktop and the agent.

`python -m cloudbot_provisioner.machine.local_machine --daemon <dir>` detaches (own
session, so it outlives the provisioner that started it), records its pid in
`<dir>/machine.pid` and supervises, in its own process group:

- Xvfb on a display of its own choosing (`-displayfd`), with a coloured root window,
- an xterm titled with the instance's name and id, so a person recognises the screen,
- x11vnc on the machine's VNC port, on 127.0.0.1 (where the gateway reaches it),
- the CloudBot agent (`cloudbot_provisioner.machine.agent`) on the machine's agent port.

A child that dies is started again, as an init system would. SIGTERM stops them all;
the directory (the machine's disk) stays. Tokens arrive in a private file (0600), read and
deleted at start, and reach the agent in files of its own, never in an environment
(another process of the same user can read that in /proc).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import select
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import IO

from cloudbot_provisioner.machine.agent import write_private

MACHINE_FILE = "machine.json"
PID_FILE = "machine.pid"
SECRETS_FILE = "secrets.json"
DISK_DIR = "disk"
LOG_DIR = "logs"
SCREEN = "1280x800x24"
_PALETTE = ["#1d3557", "#2a9d8f", "#6a4c93", "#8d0801", "#3a5a40", "#b5651d", "#005f73"]
# Environment handed to the desktop; nothing of the provisioner's own environment leaks.
_PASS_THROUGH = ("PATH", "LANG", "LC_ALL", "TZ")


class Sandbox:
    def __init__(self, directory: Path) -> None:
        self.spec = json.loads((directory / MACHINE_FILE).read_text())
        self.disk = directory / DISK_DIR
        self.logs = directory / LOG_DIR
        self.disk.mkdir(mode=0o700, exist_ok=True)
        self.logs.mkdir(mode=0o700, exist_ok=True)
        self.display: int | None = None
        self.children: dict[str, subprocess.Popen[bytes]] = {}
        self.stopping = False
        # The bootstrap token is spent after the first successful bootstrap; it is kept to
        # restart an agent that died before using it.
        secrets_file = directory / SECRETS_FILE
        secrets = json.loads(secrets_file.read_text()) if secrets_file.exists() else {}
        secrets_file.unlink(missing_ok=True)
        self._bootstrap_token: str | None = secrets.get("bootstrap_token")
        self._agent_token: str | None = secrets.get("agent_token")

    # --- Children -----------------------------------------------------------------------

    def _log(self, name: str) -> IO[bytes]:
        return (self.logs / f"{name}.log").open("ab")

    def _base_env(self) -> dict[str, str]:
        env = {k: os.environ[k] for k in _PASS_THROUGH if k in os.environ}
        env.update(HOME=str(self.disk), SHELL="/bin/bash", USER="cloudbot")
        return env

    def _spawn(self, name: str, argv: list[str], env: dict[str, str], **kw: object) -> None:
        with self._log(name) as log:
            self.children[name] = subprocess.Popen(  # noqa: S603 - fixed programs
                argv,
                env=env,
                cwd=self.disk,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                **kw,  # type: ignore[call-overload]
            )

    def start_display(self) -> None:
        read_fd, write_fd = os.pipe()
        try:
            self._spawn(
                "xvfb",
                [
                    "Xvfb",
                    "-displayfd",
                    str(write_fd),
                    "-screen",
                    "0",
                    SCREEN,
                    "-nolisten",
                    "tcp",
                    # Without it the server resets when its last client leaves, and
                    # takes the root colour with it.
                    "-noreset",
                ],
                self._base_env(),
                pass_fds=(write_fd,),
            )
            os.close(write_fd)
            # Xvfb writes the display number once it accepts clients: no polling races.
            ready, _, _ = select.select([read_fd], [], [], 15)
            if not ready:
                raise RuntimeError("Xvfb did not start within 15 s")
            self.display = int(os.read(read_fd, 32).decode().strip())
        finally:
            os.close(read_fd)
        digest = hashlib.sha256(self.spec["instance_id"].encode()).digest()
        colour = _PALETTE[digest[0] % len(_PALETTE)]
        subprocess.run(  # noqa: S603
            ["xsetroot", "-solid", colour],  # noqa: S607 - found on PATH, like the others
            env=self._desktop_env(),
            check=False,
            timeout=10,
        )

    def _desktop_env(self) -> dict[str, str]:
        return {**self._base_env(), "DISPLAY": f":{self.display}"}

    def start_terminal(self) -> None:
        name, instance_id = self.spec["name"], self.spec["instance_id"]
        banner = (
            'printf "CloudBot instance %s\\nid %s\\n\\n" '
            f"{shlex.quote(name)} {shlex.quote(instance_id)}"
            "; exec /bin/bash -i"
        )
        self._spawn(
            "xterm",
            [
                "xterm",
                "-T",
                f"CloudBot {name} ({instance_id[:8]})",
                "-geometry",
                "110x32+40+40",
                "-e",
                "/bin/bash",
                "-c",
                banner,
            ],
            self._desktop_env(),
        )

    def start_vnc(self) -> None:
        self._spawn(
            "x11vnc",
            [
                "x11vnc",
                "-display",
                f":{self.display}",
                "-rfbport",
                str(self.spec["desktop_port"]),
                "-localhost",
                "-nopw",
                "-forever",
                "-shared",
                "-quiet",
            ],
            self._desktop_env(),
        )

    def start_agent(self) -> None:
        env = {
            **self._base_env(),
            "CLOUDBOT_INSTANCE_ID": self.spec["instance_id"],
            "CLOUDBOT_API_URL": self.spec["api_url"],
            "CLOUDBOT_STATE_DIR": str(self.disk / "agent"),
            "CLOUDBOT_AGENT_HOST": "127.0.0.1",
            "CLOUDBOT_AGENT_PORT": str(self.spec["agent_ws_port"]),
            "CLOUDBOT_AGENT_WS_PATH": self.spec["agent_ws_path"],
            "CLOUDBOT_VNC_HOST": "127.0.0.1",
            "CLOUDBOT_VNC_PORT": str(self.spec["desktop_port"]),
            "CLOUDBOT_GATE_HOST": "127.0.0.1",
            "CLOUDBOT_GATE_VNC_PORT": str(self.spec["vnc_port"]),
            "CLOUDBOT_GATE_AGENT_PORT": str(self.spec["agent_port"]),
            "CLOUDBOT_BOOTSTRAP_PATH": self.spec["bootstrap_path"],
            "CLOUDBOT_HEARTBEAT_PATH": self.spec["heartbeat_path"],
        }
        state = self.disk / "agent"
        state.mkdir(mode=0o700, exist_ok=True)
        if self._agent_token:
            write_private(state / "agent_token", self._agent_token)
            env["CLOUDBOT_AGENT_TOKEN_FILE"] = str(state / "agent_token")
        if self._bootstrap_token and not (state / "agent.json").exists():
            write_private(state / "bootstrap_token", self._bootstrap_token)  # the agent deletes it
            env["CLOUDBOT_BOOTSTRAP_TOKEN_FILE"] = str(state / "bootstrap_token")
        self._spawn("agent", [sys.executable, "-m", "cloudbot_provisioner.machine.agent"], env)

    def start_all(self) -> None:
        self.start_display()
        self.start_terminal()
        self.start_vnc()
        self.start_agent()

    def stop_all(self) -> None:
        for child in self.children.values():
            if child.poll() is None:
                child.terminate()
        deadline = time.monotonic() + 3
        for child in self.children.values():
            try:
                child.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
        self.children.clear()

    # --- Supervision --------------------------------------------------------------------

    def run(self) -> None:
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        self.start_all()
        while not self.stopping:
            time.sleep(0.5)
            if self.stopping:
                break
            if self.children["xvfb"].poll() is not None:
                # Everything hangs off the display: start the whole desktop again.
                self.stop_all()
                time.sleep(1)
                self.start_all()
                continue
            for name, start in (
                ("xterm", self.start_terminal),
                ("x11vnc", self.start_vnc),
                ("agent", self.start_agent),
            ):
                if self.children[name].poll() is not None:
                    start()
        self.stop_all()

    def _on_signal(self, _signum: int, _frame: object) -> None:
        self.stopping = True


def _daemonize(directory: Path) -> None:
    """Fork into a new session; the parent records the child's pid and exits at once, so
    whoever launched us reaps the parent and never holds the machine as its child."""
    pid = os.fork()
    if pid > 0:
        tmp = directory / (PID_FILE + ".tmp")
        tmp.write_text(str(pid))
        tmp.replace(directory / PID_FILE)
        os._exit(0)
    os.setsid()
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    log = os.open(directory / LOG_DIR / "machine.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    os.dup2(log, 1)
    os.dup2(log, 2)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("directory", type=Path)
    parser.add_argument("--daemon", action="store_true", help="detach into a session of its own")
    args = parser.parse_args(argv)
    directory: Path = args.directory.resolve()
    (directory / LOG_DIR).mkdir(mode=0o700, exist_ok=True)
    if args.daemon:
        _daemonize(directory)
    sandbox = Sandbox(directory)
    try:
        sandbox.run()
    finally:
        sandbox.stop_all()
        pid_file = directory / PID_FILE
        if pid_file.exists() and pid_file.read_text().strip() == str(os.getpid()):
            pid_file.unlink()


if __name__ == "__main__":
    main()
