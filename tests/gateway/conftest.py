"""Fixtures for the gateway tests: the gateway as a real process, a real desktop (Xvfb and
x11vnc), a real WebSocket server standing in for the agent, and instance rows written
straight into the test database the way the provisioner fills them."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
from websockets.asyncio.server import serve

from cloudbot_common.settings import Settings
from tests.support.gateway import (
    Desktop,
    FakeAgent,
    GatewayServer,
    Owner,
    close_gates,
    free_display,
    gateway_env,
    make_owner,
    run_gateway,
)
from tests.support.processes import free_port, running, tcp_open


@pytest.fixture(scope="session", autouse=True)
async def _close_gates() -> AsyncIterator[None]:
    yield
    close_gates()


@pytest.fixture(scope="session")
def gateway(base_env: dict[str, str]) -> Iterator[GatewayServer]:
    """The gateway as deployed: the desktop relayed with splice(2)."""
    port = free_port()
    yield from run_gateway("gateway", gateway_env(base_env, port), port)


@pytest.fixture(scope="session")
def copying_gateway(base_env: dict[str, str]) -> Iterator[GatewayServer]:
    """The gateway with its portable desktop relay (GATEWAY_ZERO_COPY=false)."""
    port = free_port()
    env = gateway_env(base_env, port, GATEWAY_ZERO_COPY="false")
    yield from run_gateway("gateway-copying", env, port)


@pytest.fixture(params=["zero_copy", "copying"])
def relay_gateway(request: pytest.FixtureRequest) -> GatewayServer:
    """Each desktop relay in turn, for the tests of what a relay must do."""
    name = "gateway" if request.param == "zero_copy" else "copying_gateway"
    server: GatewayServer = request.getfixturevalue(name)
    return server


@pytest.fixture(scope="session")
def desktop() -> Iterator[Desktop]:
    """A real X display painted red, served by a real x11vnc."""
    missing = [b for b in ("Xvfb", "x11vnc", "xsetroot") if shutil.which(b) is None]
    if missing:
        if os.environ.get("CI"):
            pytest.fail(
                f"missing {', '.join(missing)}: apt-get install xvfb x11vnc x11-xserver-utils"
            )
        pytest.skip(f"missing {', '.join(missing)}")
    n = free_display()
    display, width, height = f":{n}", 320, 240
    with running(
        "xvfb",
        ["Xvfb", display, "-screen", "0", f"{width}x{height}x24", "-nolisten", "tcp", "-noreset"],
        {},
        ready=lambda: Path(f"/tmp/.X11-unix/X{n}").exists(),
    ):
        subprocess.run(
            ["xsetroot", "-solid", "red"], env={**os.environ, "DISPLAY": display}, check=True
        )
        port = free_port()
        with running(
            "x11vnc",
            [
                "x11vnc",
                "-display",
                display,
                "-rfbport",
                str(port),
                "-localhost",
                "-nopw",
                "-forever",
                "-shared",
                "-quiet",
                "-noxdamage",
            ],
            {},
            ready=tcp_open(port),
        ):
            yield Desktop(display, port, width, height)


@pytest.fixture(scope="session")
async def agent(settings: Settings) -> AsyncIterator[FakeAgent]:
    fake = FakeAgent(settings.agent_token_secret.get_secret_value())
    async with serve(
        fake.handler, "127.0.0.1", 0, process_request=fake.process_request, compression=None
    ) as server:
        fake.port = server.sockets[0].getsockname()[1]
        yield fake


@pytest.fixture
async def owner(http: httpx.AsyncClient, settings: Settings) -> Owner:
    return await make_owner(http, settings)
