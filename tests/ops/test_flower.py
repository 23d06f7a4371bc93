"""Flower, started against the real broker with the deploy config, lists a provisioning
command by name and instance id through its own API, behind its login."""

from __future__ import annotations

import ast
import json
import secrets
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest
import redis

from cloudbot_common.commands import make_celery, send_command
from cloudbot_common.lifecycle import PROVISION
from cloudbot_common.models import OutboxCommand
from cloudbot_common.settings import Settings
from tests.support.leaks import SECRETS
from tests.support.processes import PYTHON, Process, free_port, http_ok, running, wait_for

REDIS_SLOT = "flower"


@dataclass(frozen=True)
class Flower:
    url: str
    auth: tuple[str, str]
    process: Process


def event_receiver_subscribed(redis_url: str) -> bool:
    """Flower's event consumer holds a pattern subscription on the broker's db; events
    sent before it exists are lost (Redis pub/sub keeps nothing)."""
    client = redis.Redis.from_url(redis_url)
    try:
        db = client.connection_pool.connection_kwargs.get("db", 0)
        clients: list[dict[str, str]] = client.client_list()  # type: ignore[assignment]
        return any(int(c.get("db", -1)) == db and int(c.get("psub", 0)) > 0 for c in clients)
    finally:
        client.close()


def start_flower(env: dict[str, str], app: str) -> Iterator[Flower]:
    port = free_port()
    user, password = "ops", "flower-" + secrets.token_urlsafe(18)
    SECRETS.add(password)
    env = {**env, "FLOWER_USER": user, "FLOWER_PASSWORD": password}
    argv = [
        PYTHON, "-m", "celery", "-A", app, "flower",
        "--conf=deploy/flowerconfig.py", f"--port={port}",
    ]  # fmt: skip
    ready = http_ok(f"http://127.0.0.1:{port}/healthcheck")
    with running("flower", argv, env, ready=ready) as process:
        wait_for(lambda: event_receiver_subscribed(env["REDIS_URL"]), 20, "Flower's events")
        yield Flower(f"http://127.0.0.1:{port}", (user, password), process)


@pytest.fixture(scope="module")
def flower(private_env: dict[str, str]) -> Iterator[Flower]:
    yield from start_flower(private_env, "tests.ops.flower_app")


def find_task(flower: Flower, task_id: str, timeout: float = 20) -> dict[str, object]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = httpx.get(f"{flower.url}/api/tasks", auth=flower.auth, timeout=5)
        assert r.status_code == 200, r.text
        tasks = r.json()
        if task_id in tasks:
            return tasks[task_id]
        time.sleep(0.1)
    raise AssertionError(f"Flower never listed task {task_id}")


def test_flower_lists_a_provisioning_command(flower: Flower, private_env: dict[str, str]) -> None:
    settings = Settings(redis_url=private_env["REDIS_URL"], environment="test")
    celery = make_celery(settings, "flower-test-producer")
    instance_id, command_id = uuid.uuid4(), uuid.uuid4()
    try:
        send_command(
            celery,
            OutboxCommand(id=command_id, task=PROVISION.task, instance_id=instance_id),
        )
    finally:
        celery.close()

    task = find_task(flower, str(command_id))
    assert task["name"] == "cloudbot.instances.provision"
    kwargs = ast.literal_eval(str(task["kwargs"]))
    # Ids only: nothing else, and so no secret, travels with a command.
    assert kwargs == {"instance_id": str(instance_id), "command_id": str(command_id)}
    assert ast.literal_eval(str(task["args"])) in ((), [])


def test_flower_logs_like_every_service(flower: Flower) -> None:
    lines = [line for line in flower.process.log_text().splitlines() if line.strip()]
    assert lines
    for line in lines:
        record = json.loads(line)
        assert record["service"] == "flower"
    assert any("Connected to redis" in json.loads(line)["event"] for line in lines)


def test_flower_requires_its_login(flower: Flower) -> None:
    for path in ("/api/tasks", "/tasks", "/"):
        r = httpx.get(f"{flower.url}{path}", timeout=5)
        assert r.status_code == 401, path
        r = httpx.get(f"{flower.url}{path}", auth=(flower.auth[0], "wrong-password"), timeout=5)
        assert r.status_code == 401, path
    assert httpx.get(f"{flower.url}/", auth=flower.auth, timeout=5).status_code == 200


def test_flower_is_monitoring_only(flower: Flower) -> None:
    r = httpx.post(f"{flower.url}/api/worker/shutdown/celery@nowhere", auth=flower.auth, timeout=5)
    assert r.status_code == 403
