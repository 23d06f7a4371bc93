"""The API's Prometheus endpoint on its internal listener: request figures by route, and
the platform gauges read from Postgres and the broker at scrape time."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import asyncpg
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from cloudbot_common.commands import make_celery, send_command
from cloudbot_common.lifecycle import START, STOP
from cloudbot_common.models import OutboxCommand
from cloudbot_common.settings import Settings
from tests.support.processes import PYTHON, free_port, http_ok, running

REDIS_SLOT = "metrics"


@dataclass(frozen=True)
class Api:
    url: str  # the public listener
    metrics_url: str  # the internal one


@pytest.fixture(scope="module")
def api(private_env: dict[str, str]) -> Iterator[Api]:
    port, metrics_port = free_port(), free_port()
    env = {**private_env, "API_PORT": str(port), "API_METRICS_PORT": str(metrics_port)}
    with running(
        "api-metrics",
        [PYTHON, "-m", "cloudbot_api"],
        env,
        ready=http_ok(f"http://127.0.0.1:{port}/healthz"),
    ):
        yield Api(f"http://127.0.0.1:{port}", f"http://127.0.0.1:{metrics_port}")


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def samples(text: str) -> Samples:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(found: Samples, name: str, **labels: str) -> float:
    return found[(name, frozenset(labels.items()))]


async def scrape(api: Api) -> Samples:
    async with httpx.AsyncClient(base_url=api.metrics_url, timeout=10) as client:
        r = await client.get("/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    return samples(r.text)


async def test_metrics_are_served_on_the_internal_listener_only(api: Api) -> None:
    async with httpx.AsyncClient(timeout=10) as client:
        public = await client.get(f"{api.url}/metrics")
        assert public.status_code == 404
        assert public.headers["content-type"].startswith("application/problem+json")
        assert "cloudbot_instances" not in public.text
        assert (await client.get(f"{api.metrics_url}/metrics")).status_code == 200
        # Nothing of the API is reachable on the metrics listener.
        for path in ("/healthz", "/api/auth/me", "/docs", "/openapi.json"):
            assert (await client.get(f"{api.metrics_url}{path}")).status_code == 404, path


async def test_requests_are_counted_by_route_template(api: Api) -> None:
    async with httpx.AsyncClient(base_url=api.url, timeout=10) as client:
        for provider in ("openai", "anthropic"):
            r = await client.delete(f"/api/user/api-keys/{provider}")
            assert r.status_code == 401
        assert (await client.get("/healthz")).status_code == 200

    found = await scrape(api)
    route = "/api/user/api-keys/{provider}"
    assert value(found, "http_requests_total", handler=route, method="DELETE", status="401") == 2
    assert value(found, "http_request_duration_seconds_count", handler=route, method="DELETE") == 2
    handlers = {
        dict(labels).get("handler") for name, labels in found if name == "http_requests_total"
    }
    # One series per route, never per concrete path; probes and the scrape are left out.
    assert "/api/user/api-keys/openai" not in handlers
    assert not handlers & {"/healthz", "/readyz", "/metrics"}


async def test_platform_gauges_are_read_at_scrape_time(
    api: Api, private_env: dict[str, str]
) -> None:
    found = await scrape(api)
    assert value(found, "cloudbot_provisioning_queue_depth") == 0
    assert value(found, "cloudbot_outbox_lag_seconds") == 0
    assert value(found, "cloudbot_instances", state="running") == 0
    assert value(found, "cloudbot_metrics_source_up", source="postgres") == 1
    assert value(found, "cloudbot_metrics_source_up", source="broker") == 1

    # Two instances and a command the provisioner has not completed for two minutes.
    conn = await asyncpg.connect(private_env["DATABASE_URL"].replace("+asyncpg", ""))
    try:
        owner = uuid.uuid4()
        await conn.execute(
            "INSERT INTO users (id, email, password_hash) VALUES ($1, $2, 'x')",
            owner,
            f"metrics-{owner.hex[:8]}@example.com",
        )
        ids = [uuid.uuid4(), uuid.uuid4()]
        for instance_id, state in zip(ids, ("running", "stopped"), strict=True):
            await conn.execute(
                "INSERT INTO instances (id, owner_id, name, size, instance_type, backend, state)"
                " VALUES ($1, $2, 'm', 'small', 't3.small', 'local', $3)",
                instance_id,
                owner,
                state,
            )
        await conn.execute(
            "INSERT INTO outbox_commands (id, task, instance_id, publish_attempts, created_at)"
            " VALUES ($1, $2, $3, 0, now() - interval '120 seconds')",
            uuid.uuid4(),
            STOP.task,
            ids[0],
        )
    finally:
        await conn.close()

    # Three commands waiting in the queue; nothing consumes this private broker db.
    settings = Settings(redis_url=private_env["REDIS_URL"], environment="test")
    celery = make_celery(settings, "metrics-test")
    try:
        for instance_id in (*ids, ids[0]):
            row = OutboxCommand(id=uuid.uuid4(), task=START.task, instance_id=instance_id)
            send_command(celery, row)
    finally:
        celery.close()

    found = await scrape(api)
    assert value(found, "cloudbot_provisioning_queue_depth") == 3
    assert value(found, "cloudbot_instances", state="running") == 1
    assert value(found, "cloudbot_instances", state="stopped") == 1
    assert value(found, "cloudbot_instances", state="pending") == 0
    assert value(found, "cloudbot_outbox_pending") == 1
    assert 120 <= value(found, "cloudbot_outbox_lag_seconds") < 3600
