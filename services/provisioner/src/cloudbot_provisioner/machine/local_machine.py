"""One local sandbox machine: its init on the host, which keeps the sandbox running.

`python -m cloudbot_provisioner.machine.local_machine --daemon <dir>` detaches (own
session, so it outlives the provisioner that started it), records its pid in
`<dir>/machine.pid` and runs, in its own process group, the machine's sandbox: bubblewrap
with namespaces of its own (user, processes, network, mounts, IPC, host name), in which
`desktop.py` runs the desktop and the agent as an unprivileged user (uid 1000).

What the sandbox sees: the system's programs and libraries (read-only), the agent and its
one library, the machine's disk as its home and its logs. Not the control plane's files,
its `.env`, other processes (its /proc is its own) or other machines' directories. Its
network is its own loopback: VNC and the agent's WebSocket listen there, out of reach of
the host and of other desktops; Postgres and Redis on the host are out of its reach too.
Two ways lead out, both made here: the gate's listening sockets (127.0.0.1 on the host,
the ports the gateway connects to), handed in as file descriptors, and a Unix socket the
init relays to the API for bootstrap and heartbeats.

A sandbox that dies is started again, as a machine reboots. SIGTERM stops it; the
directory (the machine's disk) stays. Tokens arrive in a private file (0600), read and
deleted at start, and reach the agent in files of their own under `keys/`, mounted
read-only, never in an environment.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
from pathlib import Path

import websockets

from cloudbot_provisioner.machine.agent import write_private

MACHINE_FILE = "machine.json"
PID_FILE = "machine.pid"
SECRETS_FILE = "secrets.json"
DISK_DIR = "disk"
LOG_DIR = "logs"
# Inside the sandbox.
_HOME = "/home/cloudbot"
_OPT = "/opt/cloudbot"
_RUN = "/run/cloudbot"
_KEYS = "/run/cloudbot-keys"
_LOGS = "/var/log/cloudbot"
_UID = 1000
_HERE = Path(__file__).resolve().parent
# Of the host's /etc, only what the desktop's programs read (fonts, the linker's cache).
_ETC = ("fonts", "ld.so.cache", "localtime", "alternatives", "X11", "terminfo")


class Machine:
    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.spec = json.loads((directory / MACHINE_FILE).read_text())
        for name in (DISK_DIR, LOG_DIR, "logs/desktop", "keys", "run", "etc"):
            (directory / name).mkdir(mode=0o700, exist_ok=True)
        secrets_file = directory / SECRETS_FILE
        secrets = json.loads(secrets_file.read_text()) if secrets_file.exists() else {}
        secrets_file.unlink(missing_ok=True)
        keys = directory / "keys"
        if secrets.get("agent_token"):
            write_private(keys / "agent_token", secrets["agent_token"])
        # The bootstrap token is spent after the first successful bootstrap; until then it
        # stays, for an agent that died before using it.
        if secrets.get("bootstrap_token"):
            write_private(keys / "bootstrap_token", secrets["bootstrap_token"])
        if secrets.get("identity"):
            write_private(keys / "identity", json.dumps(secrets["identity"]))
        self.child: subprocess.Popen[bytes] | None = None
        self.stopping = False
        self.listeners = [
            self._listen(self.spec["vnc_port"]),
            self._listen(self.spec["agent_port"]),
        ]

    @staticmethod
    def _listen(port: int) -> socket.socket:
        """The gate's listening socket on the host. A sandbox just stopped may hold the
        port for a moment longer (its processes end with its process namespace)."""
        deadline = time.monotonic() + 10
        while True:
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                sock.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
                continue
            sock.listen(128)
            sock.set_inheritable(True)
            return sock

    # --- The sandbox ---------------------------------------------------------------------

    def _sandbox_argv(self) -> list[str]:
        d = self.dir
        argv = ["bwrap", "--unshare-all", "--die-with-parent", "--hostname", "cloudbot"]
        argv += ["--uid", str(_UID), "--gid", str(_UID)]
        argv += ["--ro-bind", "/usr", "/usr"]
        for name in ("bin", "lib", "lib64", "lib32", "sbin"):
            path = Path("/") / name
            if path.is_symlink():
                argv += ["--symlink", os.readlink(path), str(path)]
            elif path.exists():
                argv += ["--ro-bind", str(path), str(path)]
        for name in _ETC:
            argv += ["--ro-bind-try", f"/etc/{name}", f"/etc/{name}"]
        argv += ["--ro-bind", str(d / "etc" / "passwd"), "/etc/passwd"]
        argv += ["--ro-bind", str(d / "etc" / "group"), "/etc/group"]
        python = Path(sys.base_prefix)
        if not python.is_relative_to("/usr"):
            argv += ["--ro-bind", str(python), str(python)]
        argv += ["--ro-bind", str(Path(websockets.__file__).parent), f"{_OPT}/lib/websockets"]
        for name in ("agent.py", "desktop.py"):
            argv += ["--ro-bind", str(_HERE / name), f"{_OPT}/{name}"]
        argv += ["--ro-bind", str(d / "etc" / "desktop.json"), f"{_OPT}/desktop.json"]
        argv += ["--ro-bind", str(d / "keys"), _KEYS, "--ro-bind", str(d / "run"), _RUN]
        argv += ["--bind", str(d / DISK_DIR), _HOME, "--bind", str(d / LOG_DIR / "desktop"), _LOGS]
        argv += ["--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp", "--chdir", _HOME]  # noqa: S108
        argv += ["--clearenv"]
        for key, value in self._sandbox_env().items():
            argv += ["--setenv", key, value]
        # The interpreter the control plane runs on, not its virtual environment.
        return [
            *argv,
            os.path.realpath(sys.executable),
            f"{_OPT}/desktop.py",
            f"{_OPT}/desktop.json",
        ]

    def _sandbox_env(self) -> dict[str, str]:
        vnc, agent = (s.fileno() for s in self.listeners)
        env = {
            "PATH": "/usr/local/bin:/usr/bin:/bin",
            "HOME": _HOME,
            "LANG": os.environ.get("LANG", "C.UTF-8"),
            "PYTHONPATH": f"{_OPT}/lib",
            "CLOUDBOT_INSTANCE_ID": self.spec["instance_id"],
            "CLOUDBOT_API_URL": self.spec["api_url"],
            "CLOUDBOT_API_SOCKET": f"{_RUN}/api.sock",
            "CLOUDBOT_AGENT_WS_PATH": self.spec["agent_ws_path"],
            "CLOUDBOT_BOOTSTRAP_PATH": self.spec["bootstrap_path"],
            "CLOUDBOT_HEARTBEAT_PATH": self.spec["heartbeat_path"],
            "CLOUDBOT_GATE_FDS": f"vnc={vnc},agent={agent}",
            "CLOUDBOT_AGENT_TOKEN_FILE": f"{_KEYS}/agent_token",
        }
        if (self.dir / "keys" / "bootstrap_token").exists():
            env["CLOUDBOT_BOOTSTRAP_TOKEN_FILE"] = f"{_KEYS}/bootstrap_token"
        if (self.dir / "keys" / "identity").exists():
            env["CLOUDBOT_IDENTITY_FILE"] = f"{_KEYS}/identity"
        return env

    def _prepare(self) -> None:
        etc = self.dir / "etc"
        (etc / "passwd").write_text(
            f"root:x:0:0::/root:/usr/sbin/nologin\ncloudbot:x:{_UID}:{_UID}:CloudBot:{_HOME}:/bin/bash\n"
        )
        (etc / "group").write_text(f"root:x:0:\ncloudbot:x:{_UID}:\n")
        desktop = {k: self.spec[k] for k in ("instance_id", "name")} | {"log_dir": _LOGS}
        (etc / "desktop.json").write_text(json.dumps(desktop))
        if (self.dir / DISK_DIR / "agent" / "agent.json").exists():
            (self.dir / "keys" / "bootstrap_token").unlink(missing_ok=True)
            (self.dir / "keys" / "identity").unlink(missing_ok=True)

    def start(self) -> None:
        self._prepare()
        with (self.dir / LOG_DIR / "sandbox.log").open("ab") as log:
            self.child = subprocess.Popen(  # noqa: S603 - fixed program, our own arguments
                self._sandbox_argv(),
                env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                pass_fds=[s.fileno() for s in self.listeners],
            )

    def stop(self) -> None:
        child, self.child = self.child, None
        if child is None or child.poll() is not None:
            return
        child.terminate()
        try:
            child.wait(5)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()

    # --- The way to the API ------------------------------------------------------------

    def relay_api(self) -> None:
        """Relays the sandbox's Unix socket to the API's address, in a thread of its own."""
        url = urllib.parse.urlsplit(self.spec["api_url"])
        host, port = url.hostname or "127.0.0.1", url.port or (443 if url.scheme == "https" else 80)
        # Bound by a relative name: the directory's full path may be longer than a Unix
        # socket's address allows.
        os.chdir(self.dir / "run")
        Path("api.sock").unlink(missing_ok=True)
        loop = asyncio.new_event_loop()
        server = loop.run_until_complete(
            asyncio.start_unix_server(lambda r, w: _relay(r, w, host, port), path="api.sock")
        )
        # For the sandbox's user; outside it, the machine's directory (0700) hides it.
        os.chmod("api.sock", 0o666)  # noqa: S103
        threading.Thread(target=loop.run_forever, daemon=True, name="api-relay").start()
        self._api_server = server

    # --- Supervision ---------------------------------------------------------------------

    def run(self) -> None:
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        self.relay_api()
        self.start()
        while not self.stopping:
            time.sleep(0.5)
            if not self.stopping and self.child is not None and self.child.poll() is not None:
                time.sleep(1)
                if not self.stopping:
                    self.start()
        self.stop()

    def _on_signal(self, _signum: int, _frame: object) -> None:
        self.stopping = True


async def _relay(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, host: str, port: int
) -> None:
    try:
        up_reader, up_writer = await asyncio.wait_for(asyncio.open_connection(host, port), 10)
    except (OSError, TimeoutError):
        writer.close()
        return

    async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            while data := await src.read(65536):
                dst.write(data)
                await dst.drain()
        dst.close()

    await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))


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
    machine = Machine(directory)
    try:
        machine.run()
    finally:
        machine.stop()
        pid_file = directory / PID_FILE
        if pid_file.exists() and pid_file.read_text().strip() == str(os.getpid()):
            pid_file.unlink()


if __name__ == "__main__":
    main()
