"""GATEWAY_WORKERS: several gateway processes on one port under a supervisor. Sessions
spread over the workers, /metrics adds them up, a dead worker is replaced, SIGTERM drains
them all, and workers never outlive their supervisor."""

from __future__ import annotations

import os
import signal
import socket
from collections.abc import Iterator
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed

from cloudbot_common.procfs import alive, children, socket_count, tcp_listeners
from cloudbot_gateway.workers import available_cpus, worker_count
from tests.support.gateway import (
    FakeAgent,
    GatewayServer,
    Owner,
    add_instance,
    gateway_env,
    scrape,
    wait_closed,
    ws_connect,
)
from tests.support.processes import (
    PYTHON,
    Process,
    free_port,
    http_ok,
    running,
    wait_for,
)
from tests.support.waiting import eventually

WORKERS = 2
OPEN = ("cloudbot_gateway_open_sessions", (("channel", "cloudbot"),))
LISTENING = ("cloudbot_gateway_workers", ())


@pytest.fixture
def workers_gateway(base_env: dict[str, str]) -> Iterator[tuple[GatewayServer, Process]]:
    port = free_port()
    env = gateway_env(
        base_env,
        port,
        GATEWAY_WORKERS=str(WORKERS),
        GATEWAY_MAX_SESSIONS_PER_USER="100",
        GATEWAY_DRAIN_TIMEOUT_SECONDS="1",
    )
    argv = [PYTHON, "-m", "cloudbot_gateway"]
    with running(
        "gateway-workers", argv, env, ready=http_ok(f"http://127.0.0.1:{port}/readyz")
    ) as process:
        wait_for(lambda: tcp_listeners(port) == WORKERS, what="every worker listening")
        yield GatewayServer(port, process.pid, int(env["GATEWAY_METRICS_PORT"])), process


@dataclass
class Workers:
    """A gateway of WORKERS workers, an owner and their instance whose agent answers."""

    gateway: GatewayServer
    supervisor: Process
    pids: list[int]  # the workers it started with
    url: str  # the owner's agent channel
    owner: Owner

    async def open(self, stack: AsyncExitStack) -> ClientConnection:
        ws = await stack.enter_async_context(
            ws_connect(self.url, additional_headers=self.owner.bearer)
        )
        await ws.send("hello")
        assert await ws.recv() == "hello"
        return ws

    async def spread(self, stack: AsyncExitStack) -> list[ClientConnection]:
        """Sessions on every worker. The kernel hashes each new connection to a worker:
        open sessions until each holds some (the chance of 40 all landing on one is 2^-39)."""
        before = {pid: socket_count(pid) for pid in self.pids}
        sessions: list[ClientConnection] = []
        while len(sessions) < 40 and not all(socket_count(p) > before[p] for p in self.pids):
            sessions.append(await self.open(stack))
        assert all(socket_count(p) > before[p] for p in self.pids)
        return sessions

    async def counted_open(self, expected: int) -> bool:
        return (await scrape(self.gateway)).get(OPEN) == expected


@pytest.fixture
async def workers(
    workers_gateway: tuple[GatewayServer, Process],
    db_engine: AsyncEngine,
    owner: Owner,
    agent: FakeAgent,
) -> Workers:
    gateway, supervisor = workers_gateway
    pids = children(supervisor.pid)
    assert len(pids) == WORKERS
    instance_id = await add_instance(db_engine, owner.id, agent_port=agent.port)
    agent.allow(instance_id)
    url = f"{gateway.ws_url}/api/instances/{instance_id}/cloudbot"
    return Workers(gateway, supervisor, pids, url, owner)


async def test_sessions_spread_over_the_workers_and_metrics_add_up(workers: Workers) -> None:
    async with AsyncExitStack() as stack:
        opened = len(await workers.spread(stack))
        # Every scrape is a new connection, answered by whichever worker it lands on.
        for _ in range(6):
            metrics = await scrape(workers.gateway)
            assert (metrics[OPEN], metrics[LISTENING]) == (opened, WORKERS)
    await eventually(lambda: workers.counted_open(0), what="sessions counted closed")


async def test_a_dead_worker_is_replaced_and_the_rest_carry_on(workers: Workers) -> None:
    victim, survivor = workers.pids
    supervisor = workers.supervisor
    async with AsyncExitStack() as stack:
        sessions = await workers.spread(stack)
        held = socket_count(survivor)
        os.kill(victim, signal.SIGKILL)
        await eventually(
            lambda: (
                len(children(supervisor.pid)) == WORKERS and victim not in children(supervisor.pid)
            ),
            what="a new worker",
        )
        await eventually(
            lambda: tcp_listeners(workers.gateway.port) == WORKERS, what="it listening"
        )
        assert (await scrape(workers.gateway))[LISTENING] == WORKERS
        # The victim's sessions dropped; the survivor's go on.
        alive = []
        for ws in sessions:
            try:
                await ws.send("still there?")
                assert await ws.recv() == "still there?"
                alive.append(ws)
            except ConnectionClosed:
                pass
        assert 0 < len(alive) < len(sessions)
        assert socket_count(survivor) >= held
        # The dead worker's sessions no longer count.
        await eventually(
            lambda: workers.counted_open(len(alive)), what="the dead worker's sessions uncounted"
        )
        assert supervisor.alive()
        await workers.open(stack)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["stopped", "killed"])
async def test_every_worker_drains_when_the_supervisor_stops_or_dies(
    workers: Workers, sig: signal.Signals
) -> None:
    async with AsyncExitStack() as stack:
        sessions = await workers.spread(stack)
        # The supervisor alone: SIGTERM as `docker stop` sends it, or killed outright.
        os.kill(workers.supervisor.pid, sig)
        for ws in sessions:
            await wait_closed(ws)
            assert ws.close_code == 1012
    await eventually(lambda: not any(alive(p) for p in workers.pids), what="workers gone")
    assert tcp_listeners(workers.gateway.port) == 0
    if sig == signal.SIGTERM:
        assert workers.supervisor.popen.wait(15) == 0


def test_a_worker_that_cannot_start_stops_the_gateway(base_env: dict[str, str]) -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:  # no SO_REUSEPORT: not shared
        port = taken.getsockname()[1]
        gateway = Process(
            "gateway-workers-taken",
            [PYTHON, "-m", "cloudbot_gateway"],
            gateway_env(base_env, port, GATEWAY_WORKERS=str(WORKERS)),
        )
        try:
            assert gateway.popen.wait(60) == 1
            log = gateway.log_text()
        finally:
            gateway.stop()
    assert "gateway worker could not start" in log
    assert "address already in use" in log.lower()


def test_worker_count_follows_cpus_and_quota(tmp_path: Path) -> None:
    cpus = len(os.sched_getaffinity(0))
    cpu_max = tmp_path / "cpu.max"
    assert available_cpus(cpu_max) == cpus  # no cgroup file
    cpu_max.write_text("max 100000\n")
    assert available_cpus(cpu_max) == cpus
    cpu_max.write_text("50000 100000\n")
    assert available_cpus(cpu_max) == 1  # half a CPU still needs one process
    cpu_max.write_text(f"{(cpus + 4) * 100000} 100000\n")
    assert available_cpus(cpu_max) == cpus  # never more than the CPUs it may run on
    assert worker_count(3) == 3
    assert worker_count(0) == available_cpus()
