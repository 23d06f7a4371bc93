"""Play the process supervisor an operator runs (systemd, Kubernetes, compose's
`restart: always`): start the services, and when one dies, start it again with the same
settings. Nothing else is done by hand; whatever the dead process left half-done is for
the system itself to settle.
"""

from __future__ import annotations

import contextlib
import secrets
import signal
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from cloudbot_common import procfs
from cloudbot_common.commands import make_celery
from cloudbot_common.settings import Settings
from tests.support.harness import kill_local_machines, worker_argv
from tests.support.processes import PYTHON, Process, free_port, http_ok, wait_for

CELERY = [PYTHON, "-m", "celery", "--app=cloudbot_provisioner.worker"]


@dataclass
class Service:
    name: str
    argv: list[str]
    env: dict[str, str]
    ready: Callable[[Process], bool] | None = None
    proc: Process | None = None
    restarts: int = 0

    def start(self, timeout: float = 60) -> Process:
        self.spawn()
        return self.wait_ready(timeout)

    def spawn(self) -> None:
        self.proc = Process(self.name, self.argv, self.env)

    def wait_ready(self, timeout: float = 60) -> Process:
        proc = self.proc
        assert proc is not None
        if self.ready is not None:
            check = self.ready
            wait_for(lambda: not proc.alive() or check(proc), timeout, self.name)
            if not proc.alive():
                raise RuntimeError(f"{self.name} exited early:\n{proc.log_text()[-4000:]}")
        return proc

    def kill(self) -> None:
        """SIGKILL the service and everything it started, as a crash would."""
        assert self.proc is not None
        self.proc.kill(signal.SIGKILL)
        self.proc.popen.wait(10)

    def restart(self) -> Process:
        """What the supervisor does on seeing it dead: start it again, same settings."""
        if self.proc is not None:
            self.proc.stop()
        self.restarts += 1
        return self.start()

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()


@dataclass
class Supervisor:
    env: dict[str, str]
    state_dir: Path
    services: dict[str, Service] = field(default_factory=dict)

    def api(self, name: str = "api") -> Service:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        env = {**self.env, "API_PORT": str(port), "PUBLIC_API_URL": url}
        ready = http_ok(url + "/healthz")
        return self._add(Service(name, [PYTHON, "-m", "cloudbot_api"], env, lambda _: ready()))

    def gateway(self, name: str = "gateway") -> Service:
        port = free_port()
        env = {**self.env, "GATEWAY_PORT": str(port), "GATEWAY_METRICS_PORT": str(free_port())}
        ready = http_ok(f"http://127.0.0.1:{port}/readyz")
        return self._add(Service(name, [PYTHON, "-m", "cloudbot_gateway"], env, lambda _: ready()))

    def worker(self, name: str = "worker", concurrency: int = 2) -> Service:
        node = f"{name}@{socket.gethostname()}"
        broker = self.env.get("CELERY_BROKER_URL") or self.env["REDIS_URL"]
        control = make_celery(
            Settings(redis_url=broker, celery_broker_url=broker, environment="test"),
            "tests-control",
        ).control
        argv = worker_argv(node, self.state_dir, concurrency=concurrency, beat=False)
        return self._add(
            Service(name, argv, self.env, lambda _: bool(control.ping([node], timeout=0.5)))
        )

    def beat(self, name: str = "beat") -> Service:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        schedule = self.state_dir / f"{name}-schedule"
        argv = [*CELERY, "beat", f"--schedule={schedule}", "--loglevel=INFO"]
        return self._add(Service(name, argv, self.env, lambda p: "schedule lock" in p.log_text()))

    def _add(self, service: Service) -> Service:
        self.services[service.name] = service
        return service

    def __getitem__(self, name: str) -> Service:
        return self.services[name]

    @contextlib.contextmanager
    def running(self) -> Iterator[Supervisor]:
        try:
            # Side by side, as a supervisor starts them.
            for service in self.services.values():
                service.spawn()
            for service in self.services.values():
                service.wait_ready()
            yield self
        finally:
            for service in self.services.values():
                service.stop()
            if self.env.get("LOCAL_DEV_MODE") == "true":
                # Local desktops outlive their worker, as machines do: end what is left.
                kill_local_machines(Path(self.env["LOCAL_STATE_DIR"]))


def local_desktops(base_env: dict[str, str], state_dir: Path, **extra: str) -> dict[str, str]:
    """Settings of a stack whose machines are local desktops under `state_dir`, one per
    user, with a gateway that does not wait long for open desktops when stopped."""
    return {
        **base_env,
        "LOCAL_DEV_MODE": "true",
        "LOCAL_STATE_DIR": str(state_dir / "instances"),
        "LOCAL_PORT_RANGE_START": str(20000 + secrets.randbelow(200) * 100),
        "MAX_LIVE_INSTANCES_PER_USER": "1",
        "LOG_LEVEL": "INFO",
        "GATEWAY_DRAIN_TIMEOUT_SECONDS": "1",
        **extra,
    }


def url_of(service: Service) -> str:
    return f"http://127.0.0.1:{service.env['API_PORT']}"


def pid_of_connection(client_port: int) -> int | None:
    """The process holding the local end of a loopback TCP connection from `client_port`
    (for instance the Celery child whose EC2 call the fault proxy holds)."""
    return procfs.tcp_socket_owner(client_port)


def wait_dead(pid: int, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not procfs.alive(pid):
            return
        time.sleep(0.05)
    raise TimeoutError(f"process {pid} still alive")
