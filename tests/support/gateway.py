"""What the gateway tests share: the gateway process, a real desktop, an agent in the
machine's place (each behind the machine's gate, the agent's own code), owners and their
instances, and WebSocket clients."""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import insert
from sqlalchemy.ext.asyncio import AsyncEngine
from websockets.asyncio.client import ClientConnection, connect
from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.http11 import Request, Response

from cloudbot_common.instance_contract import AGENT_WS_PATH
from cloudbot_common.models import Instance, InstanceState
from cloudbot_common.security.jwt_tokens import TokenCodec, TokenType
from cloudbot_common.security.opaque import agent_credential
from cloudbot_common.settings import Settings
from cloudbot_provisioner.machine.agent import Gate
from tests.support.leaks import SECRETS
from tests.support.processes import PYTHON, free_port, http_ok, running
from tests.support.users import User, make_user

MAX_SESSIONS_PER_USER = 3


ORIGIN = "http://app.test"  # in ALLOWED_WS_ORIGINS of the test environment


@dataclass(frozen=True)
class GatewayServer:
    port: int
    pid: int
    metrics_port: int  # the internal listener's (GATEWAY_METRICS_PORT)

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def gateway_env(base_env: dict[str, str], port: int, **extra: str) -> dict[str, str]:
    return {
        **base_env,
        "GATEWAY_PORT": str(port),
        "GATEWAY_METRICS_PORT": str(free_port()),
        "GATEWAY_MAX_SESSIONS_PER_USER": str(MAX_SESSIONS_PER_USER),
        **extra,
    }


def run_gateway(name: str, env: dict[str, str], port: int) -> Iterator[GatewayServer]:
    with running(
        name,
        [PYTHON, "-m", "cloudbot_gateway"],
        env,
        ready=http_ok(f"http://127.0.0.1:{port}/readyz"),
    ) as process:
        yield GatewayServer(port, process.pid, int(env["GATEWAY_METRICS_PORT"]))


@dataclass(frozen=True)
class Desktop:
    display: str
    vnc_port: int
    width: int
    height: int


def free_display() -> int:
    base = 140 + 10 * int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw") or 0)
    for n in range(base, base + 200):
        if not Path(f"/tmp/.X{n}-lock").exists() and not Path(f"/tmp/.X11-unix/X{n}").exists():
            return n
    raise RuntimeError("no free X display number")


@dataclass
class FakeAgent:
    """A real WebSocket server in the agent's place: it admits only the gateway presenting
    the instance's agent credential, echoes what it gets, closes when told, and records
    the close codes it receives."""

    secret: str
    port: int = 0
    credentials: set[str] = field(default_factory=set)
    closes: list[tuple[int | None, str | None]] = field(default_factory=list)
    refused: int = 0

    def allow(self, instance_id: uuid.UUID) -> None:
        credential = agent_credential(self.secret, instance_id)
        SECRETS.add(credential)
        self.credentials.add(credential)

    def process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        scheme, _, credential = request.headers.get("Authorization", "").partition(" ")
        presented = scheme == "Bearer" and credential in self.credentials
        if request.path != AGENT_WS_PATH or not presented:
            self.refused += 1
            return connection.respond(401, "agent credential required\n")
        return None

    async def handler(self, ws: ServerConnection) -> None:
        try:
            async for message in ws:
                if isinstance(message, str) and message.startswith("close "):
                    _, code, reason = message.split(" ", 2)
                    await ws.close(int(code), reason)
                    return
                await ws.send(message)
        except ConnectionClosed:
            pass
        self.closes.append((ws.close_code, ws.close_reason))


@dataclass
class Owner:
    """A user signed up through the real API, with what the gateway tests need of them."""

    user: User
    id: uuid.UUID
    session_id: uuid.UUID

    @property
    def bearer(self) -> dict[str, str]:
        return self.user.headers


async def make_owner(http: httpx.AsyncClient, settings: Settings) -> Owner:
    user = await make_user(http)
    me = await http.get("/api/auth/me", headers=user.headers)
    assert me.status_code == 200, me.text
    claims = TokenCodec(settings).decode(user.access_token, TokenType.ACCESS)
    return Owner(user, uuid.UUID(me.json()["id"]), claims.session_id)


_gates: list[asyncio.Server] = []


async def open_gate(port: int, key: str) -> int:
    """The machine's gate (the agent's own code), admitting on `key`, in front of
    127.0.0.1:`port`; its port."""
    gate = Gate(lambda: key)

    async def admit(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await gate.admit(reader, writer, "127.0.0.1", port)

    server = await asyncio.start_server(admit, "127.0.0.1", 0)
    _gates.append(server)
    return int(server.sockets[0].getsockname()[1])


def close_gates() -> None:
    for server in _gates:
        server.close()
    _gates.clear()


async def add_instance(
    db_engine: AsyncEngine,
    owner_id: uuid.UUID,
    *,
    state: InstanceState = InstanceState.RUNNING,
    vnc_port: int | None = None,
    agent_port: int | None = None,
    gated: bool = True,
) -> uuid.UUID:
    """An instance row as the provisioner leaves it once the machine is up.

    `vnc_port` and `agent_port` are the desktop's and the agent's own ports; as on a
    machine, each is put behind a gate of its own (unless not `gated`) that admits on the
    instance's agent credential, and the row names the gate's port."""
    instance_id = uuid.uuid4()
    if gated:
        key = agent_credential(Settings().agent_token_secret.get_secret_value(), instance_id)
        if vnc_port is not None:
            vnc_port = await open_gate(vnc_port, key)
        if agent_port is not None:
            agent_port = await open_gate(agent_port, key)
    async with db_engine.begin() as conn:
        await conn.execute(
            insert(Instance).values(
                id=instance_id,
                owner_id=owner_id,
                name="gateway-test",
                size="small",
                instance_type="t3.small",
                backend="local",
                state=state.value,
                host="127.0.0.1",
                vnc_port=vnc_port,
                agent_port=agent_port,
            )
        )
    return instance_id


async def ticket_for(
    http: httpx.AsyncClient, owner: Owner, instance_id: uuid.UUID, channel: str
) -> str:
    r = await http.post(
        f"/api/instances/{instance_id}/tickets", json={"channel": channel}, headers=owner.bearer
    )
    assert r.status_code == 201, r.text
    ticket = r.json()["ticket"]
    SECRETS.add(ticket)
    return str(ticket)


def ws_connect(url: str, **kwargs: Any) -> connect:
    """A plain client: no compression, no proxy from the environment, any message size."""
    options: dict[str, Any] = {
        "compression": None,
        "proxy": None,
        "open_timeout": 10,
        "max_size": None,
    }
    return connect(url, **(options | kwargs))


async def refused(url: str, **kwargs: Any) -> Response:
    """The HTTP response with which the gateway refused the upgrade."""
    with pytest.raises(InvalidStatus) as info:
        async with ws_connect(url, **kwargs):
            pass
    return info.value.response


async def scrape(gateway: GatewayServer) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """The gateway's metrics: (name, sorted labels) -> value."""
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{gateway.metrics_port}") as client:
        text = (await client.get("/metrics")).text
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


async def wait_closed(ws: ClientConnection, timeout: float = 10) -> None:
    async with asyncio.timeout(timeout):
        await ws.wait_closed()


async def personal_token(http: httpx.AsyncClient, headers: dict[str, str], scope: str) -> dict:
    r = await http.post(
        "/api/user/tokens", json={"name": f"gateway {scope}", "scope": scope}, headers=headers
    )
    assert r.status_code == 201, r.text
    SECRETS.add(r.json()["token"])
    return r.json()
