"""What the benchmark runs against: a throwaway database with a user and a running
instance pointed at the TCP source, a real access token, and the processes (source,
gateway, the gateway with its copying relay, websockify). Their CPU and memory are read
with `cloudbot_common.procfs`."""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import httpx
from sqlalchemy import insert
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import create_async_engine

from cloudbot_common.models import Instance, InstanceState, User
from cloudbot_common.security.jwt_tokens import TokenCodec, TokenType
from cloudbot_common.security.opaque import agent_credential
from cloudbot_common.settings import Settings
from cloudbot_gateway.workers import available_cpus

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
# Gateway processes under test (GATEWAY_WORKERS). One by default: on a small machine the
# client and source take about a core themselves (README, Performance).
GATEWAY_WORKERS = int(os.environ.get("BENCH_GATEWAY_WORKERS", "1")) or available_cpus()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --- processes -----------------------------------------------------------------------


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]

    @property
    def pid(self) -> int:
        return self.popen.pid

    def stop(self) -> None:
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGTERM)
            try:
                self.popen.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait(5)


def _wait(check: object, proc: Proc, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.popen.poll() is not None:
            raise RuntimeError(f"{proc.name} exited early (code {proc.popen.returncode})")
        with contextlib.suppress(Exception):
            if check():  # type: ignore[operator]
                return
        time.sleep(0.05)
    raise RuntimeError(f"{proc.name} not ready after {timeout} s")


def _tcp_open(port: int) -> bool:
    with socket.create_connection(("127.0.0.1", port), timeout=0.5):
        return True


def start(name: str, argv: list[str], env: dict[str, str] | None = None) -> Proc:
    log_dir = ROOT / ".bench-logs"
    log_dir.mkdir(exist_ok=True)
    log = (log_dir / f"{name}.log").open("wb")
    popen = subprocess.Popen(
        argv,
        env={**os.environ, **(env or {})},
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=ROOT,
        start_new_session=True,
    )
    return Proc(name, popen)


@dataclass(frozen=True)
class Stack:
    source_port: int
    gateway_port: int
    copying_port: int
    websockify_port: int
    gateway: Proc
    copying: Proc  # the gateway with GATEWAY_ZERO_COPY=false
    websockify: Proc
    source: Proc
    instance_id: uuid.UUID
    token: str
    gateway_metrics_port: int  # the gateway's internal metrics listener

    @property
    def vnc_path(self) -> str:
        return f"/api/instances/{self.instance_id}/vnc"

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}


def _admin_url(settings: Settings) -> str:
    url = make_url(settings.database_url)
    return url.set(drivername="postgresql", database="postgres").render_as_string(
        hide_password=False
    )


async def create_database(settings: Settings) -> str:
    """A throwaway database on DATABASE_URL's server, migrated to head; its URL."""
    name = f"cloudbot_bench_{secrets.token_hex(4)}"
    conn = await asyncpg.connect(_admin_url(settings))
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    url = make_url(settings.database_url)
    database_url = url.set(database=name).render_as_string(hide_password=False)
    migrate = await asyncio.create_subprocess_exec(
        PYTHON, "-m", "cloudbot_common.migrate", "upgrade", "head",
        env={**os.environ, "ENVIRONMENT": "test", "DATABASE_URL": database_url},
        stdout=subprocess.DEVNULL,
    )  # fmt: skip
    if await migrate.wait() != 0:
        raise RuntimeError("migration failed")
    return database_url


async def drop_database(settings: Settings, database_url: str) -> None:
    conn = await asyncpg.connect(_admin_url(settings))
    try:
        await conn.execute(
            f'DROP DATABASE IF EXISTS "{make_url(database_url).database}" WITH (FORCE)'
        )
    finally:
        await conn.close()


async def seed(
    database_url: str, *, password_hash: str, instances: int, vnc_port: int
) -> tuple[uuid.UUID, str, list[uuid.UUID]]:
    """A user and `instances` running instances of theirs: (user id, email, instance ids)."""
    engine = create_async_engine(database_url)
    user_id = uuid.uuid4()
    email = f"bench-{user_id.hex[:8]}@example.com"
    ids = [uuid.uuid4() for _ in range(instances)]
    async with engine.begin() as db:
        await db.execute(insert(User).values(id=user_id, email=email, password_hash=password_hash))
        for n, instance_id in enumerate(ids):
            await db.execute(
                insert(Instance).values(
                    id=instance_id, owner_id=user_id, name=f"bench-{n}", size="small",
                    instance_type="t3.small", backend="local",
                    state=InstanceState.RUNNING.value, host="127.0.0.1", vnc_port=vnc_port,
                    agent_port=None,
                )
            )  # fmt: skip
    await engine.dispose()
    return user_id, email, ids


async def _prepare_database(
    settings: Settings, gated_port: int
) -> tuple[str, uuid.UUID, uuid.UUID]:
    database_url = await create_database(settings)
    user_id, _, ids = await seed(
        database_url, password_hash="!unusable", instances=1, vnc_port=gated_port
    )
    return database_url, user_id, ids[0]


def _workers_listening(metrics_port: int) -> int:
    text = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=1).text
    return int(float(text.split("\ncloudbot_gateway_workers ", 1)[1].split()[0]))


def _start_gateway(
    name: str, port: int, metrics_port: int, database_url: str, redis_url: str, **env: str
) -> Proc:
    """The gateway with GATEWAY_WORKERS processes, once every one of them listens."""
    gateway = start(
        name,
        [PYTHON, "-m", "cloudbot_gateway"],
        {
            "ENVIRONMENT": "test",
            "DATABASE_URL": database_url,
            "REDIS_URL": redis_url,
            "GATEWAY_PORT": str(port),
            "GATEWAY_METRICS_PORT": str(metrics_port),
            "GATEWAY_MAX_SESSIONS_PER_USER": "1000000",
            "GATEWAY_IDLE_TIMEOUT_SECONDS": "3600",
            "GATEWAY_WORKERS": str(GATEWAY_WORKERS),
            "LOG_LEVEL": os.environ.get("BENCH_GATEWAY_LOG_LEVEL", "WARNING"),
            **env,
        },
    )
    _wait(
        lambda: (
            httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200
            and _workers_listening(metrics_port) == GATEWAY_WORKERS
        ),
        gateway,
    )
    return gateway


@contextlib.contextmanager
def stack(settings: Settings, redis_url: str) -> Iterator[Stack]:
    source_port, gateway_port, websockify_port = free_port(), free_port(), free_port()
    copying_port, metrics_port, gated_port = free_port(), free_port(), free_port()
    database_url, user_id, instance_id = asyncio.run(_prepare_database(settings, gated_port))
    token = TokenCodec(settings).issue(TokenType.ACCESS, user_id, uuid.uuid4()).token
    # The gateway proves this to the source's gate, as to a machine's.
    key = agent_credential(settings.agent_token_secret.get_secret_value(), instance_id)
    procs: list[Proc] = []
    try:
        source = start(
            "source",
            [PYTHON, "-m", "bench.source", str(source_port), str(gated_port)],
            {"BENCH_GATE_KEY": key},
        )
        procs.append(source)
        _wait(lambda: _tcp_open(source_port) and _tcp_open(gated_port), source)
        gateway = _start_gateway("gateway", gateway_port, metrics_port, database_url, redis_url)
        procs.append(gateway)
        copying = _start_gateway(
            "gateway-copying", copying_port, free_port(), database_url, redis_url,
            GATEWAY_ZERO_COPY="false",
        )  # fmt: skip
        procs.append(copying)
        websockify = start(
            "websockify",
            [PYTHON, "-m", "websockify", f"127.0.0.1:{websockify_port}",
             f"127.0.0.1:{source_port}"],
        )  # fmt: skip
        procs.append(websockify)
        _wait(lambda: _tcp_open(websockify_port), websockify)
        yield Stack(
            source_port, gateway_port, copying_port, websockify_port, gateway, copying,
            websockify, source, instance_id, token, metrics_port,
        )  # fmt: skip
    finally:
        for proc in reversed(procs):
            proc.stop()
        asyncio.run(drop_database(settings, database_url))
