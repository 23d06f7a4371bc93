"""Health, readiness, metrics, idle timeout and graceful shutdown."""

from __future__ import annotations

import signal
import uuid

import httpx
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine
from websockets.exceptions import InvalidStatus

from tests.support.gateway import (
    Desktop,
    FakeAgent,
    GatewayServer,
    Owner,
    add_instance,
    gateway_env,
    refused,
    scrape,
    wait_closed,
    ws_connect,
)
from tests.support.processes import PYTHON, free_port, http_ok, running


async def test_health_and_readiness(gateway: GatewayServer) -> None:
    async with httpx.AsyncClient(base_url=gateway.http_url) as client:
        assert (await client.get("/healthz")).json() == {"status": "ok"}
        r = await client.get("/readyz")
        assert r.status_code == 200
        assert r.json()["checks"] == {
            "postgres": "ok",
            "migrations": "ok",
            "redis": "ok",
            "events": "ok",
        }


async def test_metrics_only_on_the_internal_listener(gateway: GatewayServer) -> None:
    async with httpx.AsyncClient() as client:
        public = await client.get(f"{gateway.http_url}/metrics")
        assert public.status_code == 404
        assert "cloudbot_gateway" not in public.text
        internal = f"http://127.0.0.1:{gateway.metrics_port}"
        r = await client.get(f"{internal}/metrics")
        assert r.status_code == 200
        assert "cloudbot_gateway_open_sessions" in r.text
        for path in ("/healthz", "/readyz", "/"):
            assert (await client.get(f"{internal}{path}")).status_code == 404, path


async def test_metrics(
    gateway: GatewayServer, db_engine: AsyncEngine, owner: Owner, desktop: Desktop
) -> None:
    instance_id = await add_instance(db_engine, owner.id, vnc_port=desktop.vnc_port)
    url = f"{gateway.ws_url}/api/instances/{instance_id}/vnc"
    refusals = ("cloudbot_gateway_refusals_total", (("reason", "no_credential"),))
    opened = ("cloudbot_gateway_open_sessions", (("channel", "vnc"),))
    connects = ("cloudbot_gateway_connect_seconds_count", (("channel", "vnc"),))
    before = await scrape(gateway)
    await refused(url)
    async with ws_connect(url, additional_headers=owner.bearer) as ws:
        await ws.recv()
        during = await scrape(gateway)
    assert during[refusals] == before.get(refusals, 0) + 1
    assert during[opened] >= 1
    assert during[connects] == before.get(connects, 0) + 1
    assert any(name == "cloudbot_gateway_relayed_bytes_total" for name, _ in during)


@pytest.fixture(scope="module")
def impatient_gateway(base_env: dict[str, str]):
    """A gateway with a 1-second idle timeout and a 1-second drain."""
    port = free_port()
    env = gateway_env(
        base_env, port, GATEWAY_IDLE_TIMEOUT_SECONDS="1", GATEWAY_DRAIN_TIMEOUT_SECONDS="1"
    )
    with running(
        "gateway-impatient",
        [PYTHON, "-m", "cloudbot_gateway"],
        env,
        ready=http_ok(f"http://127.0.0.1:{port}/readyz"),
    ) as process:
        yield GatewayServer(port, process.pid, int(env["GATEWAY_METRICS_PORT"])), process


async def test_idle_sessions_are_closed(
    impatient_gateway, db_engine: AsyncEngine, owner: Owner, desktop: Desktop
) -> None:
    gateway, _ = impatient_gateway
    instance_id = await add_instance(db_engine, owner.id, vnc_port=desktop.vnc_port)
    async with ws_connect(
        f"{gateway.ws_url}/api/instances/{instance_id}/vnc", additional_headers=owner.bearer
    ) as ws:
        await ws.recv()  # the server's RFB greeting; then nobody says anything
        await wait_closed(ws)
    assert (ws.close_code, ws.close_reason) == (1001, "idle timeout")


async def test_sigterm_drains_then_closes_sessions(
    impatient_gateway, db_engine: AsyncEngine, owner: Owner, agent: FakeAgent
) -> None:
    gateway, process = impatient_gateway
    instance_id = await add_instance(db_engine, owner.id, agent_port=agent.port)
    agent.allow(instance_id)
    async with ws_connect(
        f"{gateway.ws_url}/api/instances/{instance_id}/cloudbot", additional_headers=owner.bearer
    ) as ws:
        await ws.send("before")
        assert await ws.recv() == "before"
        process.kill(signal.SIGTERM)
        # Draining: no new connections, but the live session carries on meanwhile.
        # (503 if the request beat the listening socket's closing, else connection refused)
        with pytest.raises((OSError, InvalidStatus)) as info:
            async with ws_connect(
                f"{gateway.ws_url}/api/instances/{uuid.uuid4()}/cloudbot",
                additional_headers=owner.bearer,
            ):
                pass
        if isinstance(info.value, InvalidStatus):
            assert info.value.response.status_code == 503
        await ws.send("during")
        assert await ws.recv() == "during"
        await wait_closed(ws)
    assert ws.close_code == 1012  # service restart: reconnect elsewhere
    process.popen.wait(15)
    assert process.popen.returncode == 0
