"""Real peers for the provisioner and lifecycle tests (tests/provisioner, tests/e2e): a moto
server as the EC2 endpoint, a fault-injecting proxy in front of it, Celery worker
processes, and database access for requesting commands the way the API does and watching
rows converge."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import re
import secrets
import signal
import socket
import threading
import urllib.parse
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import boto3  # type: ignore[import-untyped]
import httpx
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import NullPool

from cloudbot_common import procfs
from cloudbot_common.commands import make_celery, publish, request_command
from cloudbot_common.db import create_session_factory, unit_of_work
from cloudbot_common.lifecycle import LIFECYCLE, Command, lock_instance
from cloudbot_common.models import Instance, InstanceEvent, InstanceState, OutboxCommand, User
from cloudbot_common.security.gate import connect_through_gate
from cloudbot_common.security.opaque import agent_credential
from cloudbot_common.settings import Settings
from tests.support.api import api_process
from tests.support.processes import (
    PYTHON,
    Process,
    free_port,
    running,
    tcp_open,
    wait_for,
)
from tests.support.waiting import wait_for_state

AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_REGION": "us-east-1",
    "AWS_DEFAULT_REGION": "us-east-1",
}
# Retries and waits short enough for tests, long enough to show they happen.
FAST_RETRIES = {
    "TASK_MAX_RETRIES": "2",
    "TASK_RETRY_BACKOFF_MAX_SECONDS": "1",
    "OUTBOX_RELAY_AFTER_SECONDS": "3",
    "RECONCILE_INTERVAL_SECONDS": "2",
    "BEAT_LOCK_TTL_SECONDS": "3",
}


# --- A Redis of the tests' own -------------------------------------------------------------


class RedisServer:
    """A redis-server on a free port, to use as the Celery broker (so no other test run on
    the machine shares the queue) or to stop and start again in outage tests."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._proc: Process | None = None

    def start(self) -> None:
        argv = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1"]
        self._proc = Process("redis", [*argv, "--save", "", "--appendonly", "no"], {})
        wait_for(tcp_open(self.port), 10, "redis-server")

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.stop()
            self._proc = None
        wait_for(self._refused, 10, "redis-server to stop")

    def kill(self) -> None:
        """Crash it: SIGKILL, and everything it held is gone (nothing is kept on disk)."""
        if self._proc is not None:
            self._proc.kill()
            self._proc.popen.wait(10)
        self.stop()

    def _refused(self) -> bool:
        try:
            tcp_open(self.port)()
        except OSError:
            return True
        return False


@contextlib.contextmanager
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer()
    server.start()
    try:
        yield server
    finally:
        server.stop()


# --- moto ---------------------------------------------------------------------------------


@contextlib.contextmanager
def moto_server() -> Iterator[str]:
    port = free_port()
    with running(
        "moto",
        [PYTHON, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        {"MOTO_LOG_LEVEL": "WARNING"},
        ready=tcp_open(port),
    ):
        yield f"http://127.0.0.1:{port}"


def ec2_client(endpoint: str) -> Any:
    return boto3.client(
        "ec2",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )


_NETWORK_TAG = "cloudbot-test-network"


def moto_network(endpoint: str) -> dict[str, str]:
    """EC2_SUBNET_ID and EC2_SECURITY_GROUP_IDS naming a network in the moto server at
    `endpoint`, made on first use. Its subnet maps public addresses on launch, like a
    public subnet, so that a launch that does not refuse one gets one."""
    ec2 = ec2_client(endpoint)
    tagged = [{"Name": "tag:Name", "Values": [_NETWORK_TAG]}]
    subnets = ec2.describe_subnets(Filters=tagged)["Subnets"]
    if subnets:
        subnet_id, vpc_id = subnets[0]["SubnetId"], subnets[0]["VpcId"]
        group_id = ec2.describe_security_groups(Filters=tagged)["SecurityGroups"][0]["GroupId"]
    else:
        name = [{"Key": "Name", "Value": _NETWORK_TAG}]
        vpc_id = ec2.create_vpc(
            CidrBlock="10.77.0.0/16", TagSpecifications=[{"ResourceType": "vpc", "Tags": name}]
        )["Vpc"]["VpcId"]
        group_id = ec2.create_security_group(
            GroupName=_NETWORK_TAG,
            Description="the gateway only",
            VpcId=vpc_id,
            TagSpecifications=[{"ResourceType": "security-group", "Tags": name}],
        )["GroupId"]
        subnet_id = ec2.create_subnet(
            VpcId=vpc_id,
            CidrBlock="10.77.1.0/24",
            TagSpecifications=[{"ResourceType": "subnet", "Tags": name}],
        )["Subnet"]["SubnetId"]
        ec2.modify_subnet_attribute(SubnetId=subnet_id, MapPublicIpOnLaunch={"Value": True})
    return {"EC2_SUBNET_ID": subnet_id, "EC2_SECURITY_GROUP_IDS": group_id}


TOKEN = re.compile(r"cbb_[A-Za-z0-9_-]{20,}")


def user_data_of(ec2: Any, machine_id: str) -> str:
    attr = ec2.describe_instance_attribute(InstanceId=machine_id, Attribute="userData")
    return base64.b64decode(attr["UserData"]["Value"]).decode()


def machines_tagged(ec2: Any, instance_id: str, *, include_gone: bool = False) -> list[dict]:
    filters = [{"Name": "tag:cloudbot:instance-id", "Values": [instance_id]}]
    if not include_gone:
        filters.append(
            {"Name": "instance-state-name", "Values": ["pending", "running", "stopping", "stopped"]}
        )
    pages = ec2.describe_instances(Filters=filters)
    return [i for r in pages["Reservations"] for i in r["Instances"]]


# --- A fault-injecting proxy between the provisioner and moto -----------------------------


_ERROR_XML = (
    '<?xml version="1.0" encoding="UTF-8"?>\n<Response><Errors><Error><Code>{code}</Code>'
    "<Message>{message}</Message></Error></Errors><RequestID>{rid}</RequestID></Response>"
)


@dataclass
class Fault:
    code: str
    status: int
    message: str
    times: int | None  # None: every call


_NO_INSTANCES_XML = (
    '<?xml version="1.0" encoding="UTF-8"?>\n<DescribeInstancesResponse '
    'xmlns="http://ec2.amazonaws.com/doc/2016-11-15/"><requestId>{rid}</requestId>'
    "<reservationSet/></DescribeInstancesResponse>"
)


_INSTANCE_ID = re.compile(rb"<instanceId>(i-[0-9a-f]+)</instanceId>")


@dataclass
class _Hold:
    release: threading.Event
    before: bool
    answer: bool
    matching: Callable[[bytes], bool] | None


def _hung_up(conn: socket.socket) -> bool:
    """Whether the peer of an idle connection has closed it (or reset it)."""
    conn.setblocking(False)
    try:
        return conn.recv(1, socket.MSG_PEEK) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True
    finally:
        conn.setblocking(True)


class Ec2FaultProxy:
    """Forwards EC2 query requests to moto, except for the actions told to fail (with the
    error XML EC2 sends), to hang after moto has acted (a response that never comes), or,
    for DescribeInstances, to see nothing yet (EC2 lists new machines late)."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream.rstrip("/")
        self.calls: Counter[str] = Counter()
        # The parameters of every request, by action.
        self.requests: defaultdict[str, list[dict[str, list[str]]]] = defaultdict(list)
        self._blind: dict[str, int] = {}
        self._faults: dict[str, Fault] = {}
        self._holds: dict[str, _Hold] = {}
        self.held = threading.Event()
        # The address the last held call came from, to tell which process made it.
        self.held_client: tuple[str, int] | None = None
        # Machine ids RunInstances answered with, in order.
        self.launched: list[str] = []
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                params = urllib.parse.parse_qs(body.decode())
                action = params.get("Action", [""])[0]
                with proxy._lock:
                    proxy.requests[action].append(params)
                proxy._serve(self, action, body)

            def log_message(self, *_: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> Ec2FaultProxy:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        for hold in self._holds.values():
            hold.release.set()
        self._server.shutdown()
        self._server.server_close()

    def fail(self, action: str, code: str, status: int = 503, *, times: int | None = None) -> None:
        with self._lock:
            self._faults[action] = Fault(code, status, f"Injected {code}", times)

    def blind(self, matching: str, times: int = 1) -> None:
        """The next `times` DescribeInstances calls whose request holds `matching` (a tag
        value, say) list no machine at all."""
        with self._lock:
            self._blind[matching] = times

    def _blinded(self, body: bytes) -> bool:
        for matching, left in self._blind.items():
            if left and matching.encode() in body:
                self._blind[matching] = left - 1
                return True
        return False

    def reset(self) -> None:
        with self._lock:
            self._faults.clear()
            self.calls.clear()
            self.requests.clear()
            self._blind.clear()
            for hold in self._holds.values():
                hold.release.set()
            self._holds.clear()
            self.held.clear()
            self.held_client = None
            self.launched.clear()

    def hold(
        self,
        action: str,
        *,
        before: bool = False,
        answer: bool = False,
        matching: Callable[[bytes], bool] | None = None,
    ) -> threading.Event:
        """Keep the next caller of `action` (whose request body satisfies `matching`)
        waiting until released: after moto has acted, or `before` it has. Once released,
        the held call is forwarded if it was held before, and answered if `answer`; else
        the caller is expected to have died meanwhile and gets nothing."""
        release = threading.Event()
        self._holds[action] = _Hold(release, before, answer, matching)
        return release

    def _serve(self, handler: BaseHTTPRequestHandler, action: str, body: bytes) -> None:
        with self._lock:
            self.calls[action] += 1
            blind = action == "DescribeInstances" and self._blinded(body)
            fault = self._faults.get(action)
            if fault is not None and fault.times is not None:
                fault.times -= 1
                if fault.times <= 0:
                    del self._faults[action]
        if blind:
            payload = _NO_INSTANCES_XML.format(rid=uuid.uuid4()).encode()
            self._reply(handler, 200, payload, "text/xml")
            return
        if fault is not None:
            payload = _ERROR_XML.format(
                code=fault.code, message=fault.message, rid=uuid.uuid4()
            ).encode()
            self._reply(handler, fault.status, payload, "text/xml")
            return
        headers = {
            k: v for k, v in handler.headers.items() if k.lower() not in ("host", "content-length")
        }
        with self._lock:
            hold = self._holds.get(action)
            if hold is not None and (hold.matching is None or hold.matching(body)):
                del self._holds[action]
            else:
                hold = None
        if hold is not None and hold.before:
            self._wait_released(handler, hold)
            if _hung_up(handler.connection):
                return  # the caller died before EC2 saw its call: EC2 never does
        upstream = httpx.post(self.upstream + handler.path, content=body, headers=headers)
        if action == "RunInstances":
            self.launched.extend(m.decode() for m in _INSTANCE_ID.findall(upstream.content))
        if hold is not None and not hold.before:
            self._wait_released(handler, hold)
            if not hold.answer:
                return
        self._reply(
            handler,
            upstream.status_code,
            upstream.content,
            upstream.headers.get("content-type", "text/xml"),
        )

    def _wait_released(self, handler: BaseHTTPRequestHandler, hold: _Hold) -> None:
        self.held_client = handler.client_address
        self.held.set()
        hold.release.wait(120)

    @staticmethod
    def _reply(handler: BaseHTTPRequestHandler, status: int, body: bytes, ctype: str) -> None:
        handler.send_response(status)
        handler.send_header("Content-Type", ctype)
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)


# --- Celery worker processes ---------------------------------------------------------------


PROVISIONER_APP = "cloudbot_provisioner.worker"


def worker_argv(
    node: str,
    state_dir: Path,
    *,
    concurrency: int = 2,
    beat: bool = True,
    app: str = PROVISIONER_APP,
) -> list[str]:
    argv = [
        PYTHON,
        "-m",
        "celery",
        f"--app={app}",
        "worker",
        "--queues=provisioning",
        f"--concurrency={concurrency}",
        f"--hostname={node}",
        "--without-gossip",
        "--without-mingle",
        "--loglevel=INFO",
    ]
    if beat:
        state_dir.mkdir(parents=True, exist_ok=True)
        argv += ["--beat", f"--schedule={state_dir / f'beat-{secrets.token_hex(3)}'}"]
    return argv


@contextlib.contextmanager
def provisioner(
    env: dict[str, str],
    state_dir: Path,
    *,
    name: str = "worker",
    beat: bool = True,
    app: str = PROVISIONER_APP,
) -> Iterator[Process]:
    """A real Celery worker (with embedded beat), ready to take tasks: it answers a ping
    through the broker. `app` is the module Celery loads the app from."""
    node = f"{name}-{secrets.token_hex(3)}@{socket.gethostname()}"
    broker = env.get("CELERY_BROKER_URL") or env["REDIS_URL"]
    control = make_celery(
        Settings(redis_url=broker, celery_broker_url=broker, environment="test"), "tests-control"
    ).control
    proc = Process(name, worker_argv(node, state_dir, beat=beat, app=app), env)
    try:
        wait_for(lambda: not proc.alive() or bool(control.ping([node], timeout=0.5)), 90, name)
        if not proc.alive():
            raise RuntimeError(f"{name} exited early:\n{proc.log_text()[-4000:]}")
        yield proc
    finally:
        proc.stop()


# --- The database, seeded and watched directly -------------------------------------------


class Db:
    def __init__(self, database_url: str, broker_url: str) -> None:
        self.engine: AsyncEngine = create_async_engine(database_url, poolclass=NullPool)
        self.sessions = create_session_factory(self.engine)
        self.celery = make_celery(
            Settings(redis_url=broker_url, celery_broker_url=broker_url, environment="test"),
            "tests",
        )

    async def close(self) -> None:
        await self.engine.dispose()

    async def user(self) -> uuid.UUID:
        async with unit_of_work(self.sessions) as s:
            user = User(
                id=uuid.uuid4(), email=f"p-{uuid.uuid4().hex[:12]}@example.com", password_hash="x"
            )
            s.add(user)
        return user.id

    async def create_instance(
        self, owner_id: uuid.UUID, backend: str, *, publish: bool = True, name: str = "desk"
    ) -> tuple[uuid.UUID, uuid.UUID]:
        """A new instance requested through the API's own path (`request_command` with the
        table's creating command), published after commit unless told not to. The API's
        policy around it (sizes, quota, idempotency) is tested through the API."""
        instance = Instance(
            id=uuid.uuid4(),
            owner_id=owner_id,
            name=name,
            size="small",
            instance_type="t3.small",
            backend=backend,
        )
        async with unit_of_work(self.sessions) as s:
            requested = await request_command(s, instance, LIFECYCLE.creates, None)
        if publish:
            await self.publish(requested.command)
        return instance.id, requested.command.id

    async def command(self, instance_id: uuid.UUID, command: Command) -> uuid.UUID:
        """Request `command` as the API's stop, start and delete do, and publish it."""
        async with unit_of_work(self.sessions) as s:
            instance = await lock_instance(s, instance_id)
            assert instance is not None
            requested = await request_command(s, instance, command, None)
        await self.publish(requested.command)
        return requested.command.id

    async def publish(self, row: OutboxCommand) -> None:
        await publish(self.celery, self.sessions, row)

    async def instance(self, instance_id: uuid.UUID) -> Instance:
        async with self.sessions() as s:
            row = await s.get(Instance, instance_id)
            assert row is not None
            return row

    async def history(self, instance_id: uuid.UUID) -> list[str]:
        async with self.sessions() as s:
            rows = await s.scalars(
                select(InstanceEvent.state)
                .where(InstanceEvent.instance_id == instance_id)
                .order_by(InstanceEvent.id)
            )
            return list(rows)

    async def open_commands(self, instance_id: uuid.UUID) -> int:
        async with self.sessions() as s:
            count = await s.scalar(
                select(func.count())
                .select_from(OutboxCommand)
                .where(
                    OutboxCommand.instance_id == instance_id, OutboxCommand.completed_at.is_(None)
                )
            )
            return int(count or 0)

    async def wait_state(
        self, instance_id: uuid.UUID, *states: InstanceState, timeout: float = 30
    ) -> Instance:
        """Poll until the row is in one of `states`; fail fast on an unexpected final state."""

        async def read() -> tuple[str, str | None, Instance]:
            row = await self.instance(instance_id)
            return row.state, row.state_reason, row

        return await wait_for_state(read, {s.value for s in states}, timeout)


# --- The real API, as a process, for lifecycle tests through HTTP ---------------------------


async def wait_api_state(
    http: httpx.AsyncClient,
    headers: dict[str, str],
    instance_id: str,
    state: str,
    timeout: float = 30,
    *,
    recovering: bool = False,
) -> dict[str, Any]:
    """Poll GET /api/instances/{id} until it shows `state`; fail fast on failed/terminated.
    With `recovering` (a dependency was just killed), the API's clear 503 for a dependency
    it cannot reach yet means "not yet" rather than a failure; any other error fails."""

    async def read() -> tuple[str, str | None, dict[str, Any]]:
        r = await http.get(f"/api/instances/{instance_id}", headers=headers)
        if recovering and r.status_code == 503:
            assert r.json()["code"] == "dependency_unavailable", r.text
            return "unavailable", None, {}
        assert r.status_code == 200, r.text
        body: dict[str, Any] = r.json()
        return body["state"], body["state_reason"], body

    return await wait_for_state(read, {state}, timeout)


# --- Local desktops ---------------------------------------------------------------------------


RFB = re.compile(rb"RFB 003\.00\d\n")


def instance_key(instance_id: uuid.UUID | str) -> str:
    """The instance's agent credential, which the machine's gate admits on."""
    secret = Settings().agent_token_secret.get_secret_value()
    return agent_credential(secret, uuid.UUID(str(instance_id)))


async def rfb_greeting(port: int, key: str) -> bytes:
    """What the desktop says first, reached through the machine's gate on `key`."""
    sock = await asyncio.wait_for(connect_through_gate("127.0.0.1", port, key), 5)
    reader, writer = await asyncio.open_connection(sock=sock)
    try:
        return await asyncio.wait_for(reader.readexactly(12), 5)
    finally:
        writer.close()


async def port_closed(port: int) -> bool:
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return True
    writer.close()
    return False


def kill_local_machines(root: Path) -> None:
    """Leave nothing running when a test ends early: SIGKILL every machine under `root`."""
    for pid_file in root.glob("*/machine.pid"):
        with contextlib.suppress(OSError, ValueError):
            os.killpg(int(pid_file.read_text()), signal.SIGKILL)


def machine_group(directory: Path) -> int:
    """The process group of a running local machine (its init's pid)."""
    return int((directory / "machine.pid").read_text())


def machine_processes(group: int) -> list[int]:
    """The live processes of the process group and their descendants: a sandbox's
    processes are the group's children, though the X server makes itself a group of its
    own (inside the sandbox's process namespace it cannot see the group's leader)."""
    found: list[int] = []
    pending = procfs.group_members(group)
    while pending:
        pid = pending.pop()
        if pid not in found:
            found.append(pid)
            pending += procfs.children(pid)
    return found


def environments_of(group: int) -> list[bytes]:
    """The environment every live process of the machine started with, as /proc shows it
    to any process of the same user."""
    found = (procfs.environ(pid) for pid in machine_processes(group))
    return [env for env in found if env is not None]


def processes_of(directory: Path, group: int) -> list[str]:
    """Command lines of every live process of this machine: its process group and their
    descendants, and anything naming its directory."""
    members = set(machine_processes(group))
    found = []
    for process in procfs.processes():
        args = procfs.cmdline(process.pid)
        if args is None:
            continue
        cmdline = b" ".join(args).decode()
        if process.pid in members or str(directory) in cmdline:
            found.append(cmdline)
    return found


@contextlib.contextmanager
def ec2_stack(
    base_env: dict[str, str],
    broker_url: str,
    moto_url: str,
    state_dir: Path,
    name: str,
    **extra: str,
) -> Iterator[str]:
    """The API and a worker (with its beat) driving the moto server as EC2, with the test
    environment's settings and `extra`; yields the API's URL."""
    env = {
        **base_env,
        **AWS_ENV,
        **FAST_RETRIES,
        "CELERY_BROKER_URL": broker_url,
        "LOCAL_DEV_MODE": "false",
        "AWS_ENDPOINT_URL": moto_url,
        **moto_network(moto_url),
        **extra,
    }
    with (
        api_process(env, f"api-{name}") as url,
        provisioner({**env, "PUBLIC_API_URL": url}, state_dir, name=f"{name}-worker"),
    ):
        yield url
