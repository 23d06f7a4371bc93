"""Real service processes for tests: started with the test environment, logs kept in
.test-logs/ (which the secret scan reads), stopped at the end."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx

from cloudbot_common import procfs

ROOT = Path(__file__).resolve().parents[2]
LOG_DIR = ROOT / ".test-logs"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(check: Callable[[], bool], timeout: float = 20.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except Exception:
            pass
        time.sleep(0.05)
    raise TimeoutError(f"timed out waiting for {what}")


def http_ok(url: str) -> Callable[[], bool]:
    return lambda: httpx.get(url, timeout=1).status_code == 200


def tcp_open(port: int, host: str = "127.0.0.1") -> Callable[[], bool]:
    def check() -> bool:
        with socket.create_connection((host, port), timeout=0.5):
            return True

    return check


class Process:
    def __init__(self, name: str, argv: list[str], env: dict[str, str]) -> None:
        LOG_DIR.mkdir(exist_ok=True)
        self.name = name
        self.log_path = LOG_DIR / f"{name}-{os.getpid()}-{int(time.time() * 1000)}.log"
        self._log = self.log_path.open("wb")
        self.popen = subprocess.Popen(
            argv,
            env={**os.environ, **env},
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_text(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Signal the whole process group (a Celery worker's children too)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, sig)

    def stop(self, timeout: float = 10.0) -> None:
        if self.alive():
            self.kill(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill(signal.SIGKILL)
                self.popen.wait(5)
        else:
            self.kill(signal.SIGKILL)  # leftover children of a dead leader
        self._log.close()


@contextlib.contextmanager
def running(
    name: str,
    argv: list[str],
    env: dict[str, str],
    ready: Callable[[], bool] | None = None,
    # Generous: a service starts slowly on a loaded 2-CPU machine; one that dies while
    # starting is noticed at once anyway.
    timeout: float = 90.0,
) -> Iterator[Process]:
    proc = Process(name, argv, env)
    try:
        if ready is not None:
            try:
                wait_for(lambda: (not proc.alive() and _raise_dead(proc)) or ready(), timeout, name)
            except TimeoutError:
                raise RuntimeError(
                    f"{name} did not become ready:\n{proc.log_text()[-4000:]}"
                ) from None
        yield proc
    finally:
        proc.stop()


def _raise_dead(proc: Process) -> bool:
    raise RuntimeError(f"{proc.name} exited early:\n{proc.log_text()[-4000:]}")


PYTHON = sys.executable


def leftovers(state_dir: Path) -> list[str]:
    """Anything of a machine still there: its directory, or a process naming it."""
    found = [str(p) for p in state_dir.glob("*") if p.is_dir()] if state_dir.exists() else []
    for pid in procfs.naming(str(state_dir)):
        cmdline = procfs.cmdline(pid)
        if cmdline is not None:
            found.append(b" ".join(cmdline).decode(errors="replace"))
    return found
