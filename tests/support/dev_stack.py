"""The local process stack exactly as `make dev` runs it (honcho with Procfile.dev), for
the tests of the developer's experience."""

from __future__ import annotations

import os
import secrets
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import httpx

from cloudbot_common import procfs
from tests.support.harness import kill_local_machines
from tests.support.leaks import SECRETS
from tests.support.processes import PYTHON, Process, free_port, wait_for

HONCHO = str(Path(PYTHON).with_name("honcho"))


@dataclass
class Stack:
    api: str
    gateway: str
    flower: str
    flower_auth: tuple[str, str]
    honcho: Process
    marker: str
    env: dict[str, str]
    # Held open from the start: the log stays readable even if another test session
    # sharing this work tree clears .test-logs meanwhile.
    log: BinaryIO

    def log_text(self) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace")


def processes_with(marker: str) -> list[int]:
    """Pids whose environment carries `marker` (every process the stack started)."""
    needle = marker.encode()
    return [p.pid for p in procfs.processes() if needle in (procfs.environ(p.pid) or b"")]


def run_stack(private_env: dict[str, str], state: Path) -> Iterator[Stack]:
    """The stack `make dev` runs, apart from anything else running, until the generator
    is closed."""
    api_port, gateway_port, flower_port = free_port(), free_port(), free_port()
    api_metrics_port, gateway_metrics_port = free_port(), free_port()
    marker = f"cloudbot-ops-stack-{secrets.token_hex(4)}"
    flower_auth = ("ops", "flower-" + secrets.token_urlsafe(18))
    SECRETS.add(flower_auth[1])
    env = {
        **private_env,
        # What `make dev` sets, then what keeps this stack apart from anything else running.
        "LOG_JSON": "false",
        "PATH": f"{Path(PYTHON).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "CONTROL_PLANE_ID": marker,
        "API_PORT": str(api_port),
        "PUBLIC_API_URL": f"http://127.0.0.1:{api_port}",
        "GATEWAY_PORT": str(gateway_port),
        "API_METRICS_PORT": str(api_metrics_port),
        "GATEWAY_METRICS_PORT": str(gateway_metrics_port),
        "PUBLIC_GATEWAY_URL": f"ws://127.0.0.1:{gateway_port}",
        "GATEWAY_DRAIN_TIMEOUT_SECONDS": "2",
        "FLOWER_PORT": str(flower_port),
        "FLOWER_USER": flower_auth[0],
        "FLOWER_PASSWORD": flower_auth[1],
        "LOCAL_DEV_MODE": "true",
        "LOCAL_STATE_DIR": str(state / "instances"),
        "LOCAL_PORT_RANGE_START": str(52000 + secrets.randbelow(40) * 100),
        "CELERY_BEAT_SCHEDULE": str(state / "celerybeat-schedule"),
        "WORKER_CONCURRENCY": "1",
    }
    honcho = Process(
        "dev-stack",
        [HONCHO, "--procfile", "Procfile.dev", "--env", "/dev/null", "start"],
        env,
    )
    stack = Stack(
        api=f"http://127.0.0.1:{api_port}",
        gateway=f"http://127.0.0.1:{gateway_port}",
        flower=f"http://127.0.0.1:{flower_port}",
        flower_auth=flower_auth,
        honcho=honcho,
        marker=marker,
        env=env,
        log=honcho.log_path.open("rb"),
    )
    try:
        for url in (
            f"{stack.api}/readyz",
            f"{stack.gateway}/readyz",
            f"{stack.flower}/healthcheck",
        ):
            wait_for(answering(honcho, url), 60, url)
        yield stack
    except Exception:
        print(stack.log_text()[-6000:])
        raise
    finally:
        honcho.stop(timeout=20)
        stack.log.close()
        # Desktops outlive the stack by design; a test's that were not deleted (or whose
        # delete the stop cut short) end with the test run.
        kill_local_machines(state / "instances")


def answering(honcho: Process, url: str) -> Callable[[], bool]:
    def check() -> bool:
        if not honcho.alive():
            raise RuntimeError(f"the stack exited:\n{honcho.log_text()[-6000:]}")
        return httpx.get(url, timeout=1).status_code == 200

    return check


def wait_for_state(
    client: httpx.Client, instance_id: str, state: str, timeout: float, stack: Stack
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    seen = None
    while time.monotonic() < deadline:
        body = client.get(f"/api/instances/{instance_id}").json()
        seen = body["state"]
        if seen == state:
            return body
        assert seen != "failed", body
        time.sleep(0.2)
    worker = [line for line in stack.log_text().splitlines() if "worker.1" in line]
    raise AssertionError(
        f"instance stayed {seen}, never {state}; the worker said:\n" + "\n".join(worker[-60:])
    )
