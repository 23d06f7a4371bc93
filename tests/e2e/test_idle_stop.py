"""Idle stop on real local machines (Xvfb, x11vnc, the agent), a real worker with its beat
and the gateway: a machine with no session, no input and an idle agent is warned, then
stopped through the normal command path (reason "idle"); one whose agent reports work is
not. The limit is set at create and changed later."""

from __future__ import annotations

import asyncio
import json
import secrets
from collections.abc import Iterator

import httpx
import pytest
from websockets.asyncio.client import connect

from tests.support.api import api_process
from tests.support.harness import FAST_RETRIES, kill_local_machines, provisioner, wait_api_state
from tests.support.processes import PYTHON, free_port, http_ok, running
from tests.support.users import make_user
from tests.support.waiting import eventually

pytestmark = [pytest.mark.vnc, pytest.mark.slow]


@pytest.fixture(scope="module")
def stack(base_env, broker_url, tmp_path_factory) -> Iterator[tuple[str, str]]:
    state = tmp_path_factory.mktemp("idle")
    env = {
        **base_env,
        **FAST_RETRIES,
        "CELERY_BROKER_URL": broker_url,
        "LOCAL_DEV_MODE": "true",
        "LOCAL_STATE_DIR": str(state / "instances"),
        "LOCAL_PORT_RANGE_START": str(30000 + secrets.randbelow(20000)),
        "IDLE_STOP_MINUTES": "0",
        "IDLE_WARNING_MINUTES": "1",
        "IDLE_SWEEP_SECONDS": "1",
        "HEARTBEAT_INTERVAL_SECONDS": "3",
    }
    gateway_port = free_port()
    gateway_env = {**env, "GATEWAY_PORT": str(gateway_port)}
    with (
        api_process(env, "api-idle") as url,
        provisioner({**env, "PUBLIC_API_URL": url}, state, name="idle-worker"),
        running(
            "gateway-idle",
            [PYTHON, "-m", "cloudbot_gateway"],
            gateway_env,
            ready=http_ok(f"http://127.0.0.1:{gateway_port}/readyz"),
        ),
    ):
        yield url, f"ws://127.0.0.1:{gateway_port}"
    kill_local_machines(state / "instances")


@pytest.fixture
def api_url(stack) -> str:
    return stack[0]


async def events_of(client: httpx.AsyncClient, headers: dict, instance_id: str) -> list[dict]:
    """The instance's history so far, as its SSE stream replays it."""
    out: list[dict] = []
    name = "message"
    async with client.stream(
        "GET", f"/api/instances/{instance_id}/events", headers=headers, timeout=5
    ) as response:
        try:
            async with asyncio.timeout(1.5):
                async for line in response.aiter_lines():
                    if line.startswith("event:"):
                        name = line[6:].strip()
                    elif line.startswith("data:"):
                        out.append({"event": name, **json.loads(line[5:])})
        except TimeoutError:
            pass
    return out


async def test_an_unused_machine_is_stopped_and_a_working_one_is_not(
    client: httpx.AsyncClient, stack
) -> None:
    _, gateway = stack
    user = await make_user(client)
    r = await client.post(
        "/api/instances", json={"name": "idle", "size": "small"}, headers=user.headers
    )
    assert r.status_code == 202, r.text
    idle = r.json()
    assert idle["idle_stop_minutes"] == 0  # the operator's default here
    r = await client.post(
        "/api/instances",
        json={"name": "busy", "size": "small", "idle_stop_minutes": 1},
        headers=user.headers,
    )
    assert r.status_code == 202, r.text
    busy = r.json()
    assert busy["idle_stop_minutes"] == 1
    for instance in (idle, busy):
        await wait_api_state(client, user.headers, instance["id"], "running")

    # The busy machine's agent gets a long task through the gateway, then the session ends.
    async with connect(
        f"{gateway}/api/instances/{busy['id']}/cloudbot",
        additional_headers=user.headers,
        proxy=None,
        open_timeout=10,
    ) as ws:
        hello = json.loads(await ws.recv())
        assert hello["type"] == "hello"
        await ws.send("/work 3600")
        assert json.loads(await ws.recv()) == {"type": "working", "seconds": 3600}

    # The limit is changed later on the idle one: now it counts.
    r = await client.patch(
        f"/api/instances/{idle['id']}", json={"idle_stop_minutes": 1}, headers=user.headers
    )
    assert r.status_code == 200, r.text
    assert r.json()["idle_stop_minutes"] == 1

    async def warned() -> bool:
        return any(
            e["event"] == "idle_warning" for e in await events_of(client, user.headers, idle["id"])
        )

    await eventually(warned, 75, "the idle warning")
    await wait_api_state(client, user.headers, idle["id"], "stopped", timeout=60)
    history = await events_of(client, user.headers, idle["id"])
    stopping = [e for e in history if e["event"] == "state" and e["state"] == "stopping"]
    assert [e["reason"] for e in stopping] == ["idle"]
    kinds = [e["event"] for e in history]
    assert kinds.index("idle_warning") < history.index(stopping[0])

    # The working machine is still running, and was never warned.
    r = await client.get(f"/api/instances/{busy['id']}", headers=user.headers)
    assert r.json()["state"] == "running"
    assert all(
        e["event"] != "idle_warning" for e in await events_of(client, user.headers, busy["id"])
    )

    audit = (await client.get("/api/user/audit", headers=user.headers)).json()["items"]
    commands = [
        (e["actor"].split(":")[0], e["details"]["command"], e["details"].get("reason"))
        for e in reversed(audit)
        if e["action"] == "instance.command" and e["target"] == f"instance:{idle['id']}"
    ]
    assert commands == [("session", "provision", None), ("system", "stop", "idle")]
    sessions = [e["action"] for e in audit if e["target"] == f"instance:{busy['id']}"]
    assert "gateway.session_opened" in sessions
    assert "gateway.session_closed" in sessions

    r = await client.patch(
        f"/api/instances/{idle['id']}", json={"idle_stop_minutes": -1}, headers=user.headers
    )
    assert r.status_code == 422
    other = await make_user(client)
    r = await client.patch(
        f"/api/instances/{busy['id']}", json={"idle_stop_minutes": 0}, headers=other.headers
    )
    assert r.status_code == 404
