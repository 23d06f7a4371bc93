"""The local process stack exactly as `make dev` runs it (honcho with Procfile.dev): create
an instance through the API, see its command in Flower, open its desktop through the
gateway, scrape both metrics endpoints, and stop everything with Ctrl-C."""

from __future__ import annotations

import ast
import os
import secrets
import shutil
import signal
import subprocess
from importlib.util import find_spec

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from websockets.sync.client import connect
from websockets.typing import Origin, Subprotocol

from tests.support.dev_stack import Stack, processes_with, wait_for_state
from tests.support.leaks import SECRET_NAME, SECRETS
from tests.support.processes import PYTHON, wait_for

REDIS_SLOT = "stack"
ORIGIN = "http://app.test"  # in ALLOWED_WS_ORIGINS of the test environment

pytestmark = [
    pytest.mark.slow,
    pytest.mark.vnc,
    pytest.mark.skipif(
        find_spec("cloudbot_provisioner.worker") is None
        or find_spec("cloudbot_gateway.main") is None,
        reason="needs the provisioner worker and the gateway",
    ),
    pytest.mark.skipif(
        shutil.which("Xvfb") is None, reason="needs Xvfb and x11vnc (make dev installs them)"
    ),
]


def metric_value(text: str, name: str, **labels: str) -> float:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    raise AssertionError(f"no sample {name}{labels}")


def test_make_dev_stack_end_to_end(stack: Stack) -> None:
    client = httpx.Client(base_url=stack.api, timeout=15, headers={"X-Forwarded-For": "10.9.8.7"})
    email = f"stack-{secrets.token_hex(6)}@example.com"
    password = "correct horse battery " + secrets.token_urlsafe(12)
    assert (
        client.post("/api/auth/signup", json={"email": email, "password": password}).status_code
        == 201
    )
    tokens = client.post("/api/auth/login", json={"email": email, "password": password}).json()
    SECRETS.add(password, tokens["access_token"], tokens["refresh_token"])
    client.headers["Authorization"] = f"Bearer {tokens['access_token']}"

    r = client.post("/api/instances", json={"name": "ops stack", "size": "small"})
    assert r.status_code == 202, r.text
    instance_id = r.json()["id"]
    request_id = r.headers["X-Request-ID"]
    try:
        wait_for_state(client, instance_id, "running", 120, stack)

        # The worker's lines about this command carry the id of the request that caused it.
        worker_lines = [
            line
            for line in stack.log_text().splitlines()
            if line.split("|", 1)[0].strip().endswith("worker.1") and instance_id in line
        ]
        assert worker_lines
        assert any(f"request_id={request_id}" in line for line in worker_lines), worker_lines

        # Flower lists the provisioning command by name, with the instance id and no more.
        def provision_task() -> dict | None:
            tasks = httpx.get(f"{stack.flower}/api/tasks", auth=stack.flower_auth, timeout=5).json()
            for task in tasks.values():
                if task["name"] == "cloudbot.instances.provision" and instance_id in str(
                    task["kwargs"]
                ):
                    return task
            return None

        wait_for(lambda: provision_task() is not None, 20, "the task in Flower")
        task = provision_task()
        assert task is not None
        kwargs = ast.literal_eval(str(task["kwargs"]))
        assert kwargs["instance_id"] == instance_id
        assert "command_id" in kwargs
        assert not [k for k in kwargs if SECRET_NAME.search(k)], kwargs

        # The desktop, through the gateway, with a browser's one-time ticket.
        ticket = client.post(f"/api/instances/{instance_id}/tickets", json={"channel": "vnc"})
        assert ticket.status_code == 201, ticket.text
        SECRETS.add(ticket.json()["ticket"])
        with connect(
            ticket.json()["url"],
            subprotocols=[Subprotocol("binary")],
            origin=Origin(ORIGIN),
            open_timeout=10,
        ) as ws:
            greeting = ws.recv(timeout=10)
        assert isinstance(greeting, bytes)
        assert greeting.startswith(b"RFB 003.")

        # Metrics are on the internal listeners only; the public ports answer 404.
        assert httpx.get(f"{stack.api}/metrics", timeout=5).status_code == 404
        assert httpx.get(f"{stack.gateway}/metrics", timeout=5).status_code == 404
        api_metrics = httpx.get(metrics_url(stack, "API"), timeout=5).text
        assert metric_value(api_metrics, "cloudbot_instances", state="running") == 1
        assert (
            metric_value(
                api_metrics,
                "http_requests_total",
                handler="/api/instances",
                method="POST",
                status="202",
            )
            == 1
        )
        gateway_metrics = httpx.get(metrics_url(stack, "GATEWAY"), timeout=5).text
        assert metric_value(gateway_metrics, "cloudbot_gateway_sessions_total", channel="vnc") >= 1
    finally:
        client.delete(f"/api/instances/{instance_id}")
        wait_for_state(client, instance_id, "terminated", 60, stack)
        client.close()


def metrics_url(stack: Stack, service: str) -> str:
    return f"http://127.0.0.1:{stack.env[service + '_METRICS_PORT']}/metrics"


def test_the_worker_answers_celerys_ping(stack: Stack) -> None:
    """What the worker image's HEALTHCHECK asks."""
    result = subprocess.run(
        [
            PYTHON,
            "-m",
            "celery",
            "--app=cloudbot_provisioner.worker",
            "inspect",
            "ping",
            "--timeout=10",
        ],
        env={**os.environ, **stack.env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "pong" in result.stdout


def test_ctrl_c_stops_every_process(stack: Stack) -> None:
    assert stack.honcho.alive()
    assert len(processes_with(stack.marker)) >= 5
    # A terminal's Ctrl-C: SIGINT to the foreground process group, honcho's.
    os.killpg(stack.honcho.pid, signal.SIGINT)
    stack.honcho.popen.wait(30)
    wait_for(lambda: not processes_with(stack.marker), 15, "every stack process to exit")
    log = stack.log_text()
    for name in ("api", "worker", "beat", "gateway", "flower"):
        assert f"{name}.1 stopped" in log, name
