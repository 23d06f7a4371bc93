"""The init of a local desktop sandbox, run inside it: the desktop and the agent.

`local_machine` starts this file in the sandbox (bubblewrap: its own user, processes,
network and files) as `python3 /opt/cloudbot/desktop.py /opt/cloudbot/desktop.json`. It
supervises, as an init system would, restarting any that dies:

- Xvfb on a display of its own choosing (`-displayfd`), with a coloured root window,
- an xterm titled with the instance's name and id, so a person recognises the screen,
- x11vnc on 127.0.0.1:5900, the sandbox's own loopback,
- the CloudBot agent (`agent.py`, beside this file): its WebSocket on the sandbox's
  loopback, its gate on the listening sockets handed in (CLOUDBOT_GATE_FDS).

It depends on the standard library only: nothing of the control plane is in the sandbox.
"""

from __future__ import annotations

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
from typing import IO, Any

VNC_PORT = 5900
AGENT_PORT = 7878
SCREEN = "1280x800x24"
_PALETTE = ["#1d3557", "#2a9d8f", "#6a4c93", "#8d0801", "#3a5a40", "#b5651d", "#005f73"]
_PASS_THROUGH = ("PATH", "LANG", "LC_ALL", "TZ", "PYTHONPATH")


def _read_display(fd: int, timeout: float) -> int:
    """The display number Xvfb writes once it accepts clients (no polling races).

    Xvfb writes the number and its newline in two writes, and a failed second write is
    fatal to it: the pipe stays open until the newline is in. (Closing it after the first
    read killed Xvfb whenever the read fell between the two; the desktop then started over
    until the timing happened to work, which made a start take seconds instead of one.)
    """
    deadline = time.monotonic() + timeout
    data = b""
    while not data.endswith(b"\n"):
        ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            raise RuntimeError(f"Xvfb did not start within {timeout:.0f} s")
        chunk = os.read(fd, 32)
        if not chunk:
            raise RuntimeError("Xvfb exited before it accepted clients")
        data += chunk
    return int(data)


class Desktop:
    def __init__(self, spec: dict[str, Any]) -> None:
        self.spec = spec
        self.disk = Path(os.environ.get("HOME", "/home/cloudbot"))
        self.logs = Path(spec.get("log_dir", "/var/log/cloudbot"))
        self.display: int | None = None
        self.children: dict[str, subprocess.Popen[bytes]] = {}
        self.stopping = False

    # --- Children -----------------------------------------------------------------------

    def _log(self, name: str) -> IO[bytes]:
        return (self.logs / f"{name}.log").open("ab")

    def _base_env(self) -> dict[str, str]:
        env = {k: os.environ[k] for k in _PASS_THROUGH if k in os.environ}
        env.update(HOME=str(self.disk), SHELL="/bin/bash", USER="cloudbot")
        return env

    def _spawn(self, name: str, argv: list[str], env: dict[str, str], **kw: Any) -> None:
        with self._log(name) as log:
            self.children[name] = subprocess.Popen(  # noqa: S603 - fixed programs
                argv,
                env=env,
                cwd=self.disk,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                **kw,
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
            self.display = _read_display(read_fd, timeout=15)
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
                str(VNC_PORT),
                "-localhost",
                "-nopw",
                "-forever",
                "-shared",
                "-quiet",
            ],
            self._desktop_env(),
        )

    def start_agent(self) -> None:
        """The agent, with the gate's listening sockets its init was handed (they live in
        the host's network, where the gateway reaches them) and the API through a socket."""
        env = {
            **self._base_env(),
            **{k: v for k, v in os.environ.items() if k.startswith("CLOUDBOT_")},
            "CLOUDBOT_STATE_DIR": str(self.disk / "agent"),
            "CLOUDBOT_AGENT_HOST": "127.0.0.1",
            "CLOUDBOT_AGENT_PORT": str(AGENT_PORT),
            "CLOUDBOT_VNC_HOST": "127.0.0.1",
            "CLOUDBOT_VNC_PORT": str(VNC_PORT),
        }
        fds = [int(item.partition("=")[2]) for item in env["CLOUDBOT_GATE_FDS"].split(",")]
        (self.disk / "agent").mkdir(mode=0o700, exist_ok=True)
        agent = str(Path(__file__).with_name("agent.py"))
        self._spawn("agent", [sys.executable, agent], env, pass_fds=fds)

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


def main() -> None:
    desktop = Desktop(json.loads(Path(sys.argv[1]).read_text()))
    try:
        desktop.run()
    finally:
        desktop.stop_all()


if __name__ == "__main__":
    main()
