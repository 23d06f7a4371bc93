"""One user's whole flow, as a program or a browser runs it: sign up, log in, store a
provider key, create a machine, wait for it to run, open its desktop through the gateway
and read a framebuffer update, talk to its agent, stop it, delete it.

Shared by the soak and the scale-out test. Requests go to the API replicas in turn and
WebSockets to the gateway replicas in turn, the way a load balancer spreads them; a
replica that does not answer at all (a transport error) is skipped for the next, as a
load balancer's health check would. Any HTTP error is an error of the flow.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import secrets
import struct
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
from websockets.asyncio.client import ClientConnection, connect
from websockets.typing import Origin, Subprotocol

POLL_SECONDS = 0.5


class FlowError(AssertionError):
    pass


@dataclass
class Replicas:
    """The API and gateway replicas, each list in the order a balancer tries them."""

    apis: list[str]
    gateways: list[str]  # ws://host:port
    origin: str
    # Replicas known dead (skipped until revived by the test).
    down: set[str] = field(default_factory=set)
    _turn: itertools.count[int] = field(default_factory=itertools.count)

    def pick(self, pool: list[str]) -> list[str]:
        """`pool` from the next replica round, live ones first."""
        start = next(self._turn) % len(pool)
        order = pool[start:] + pool[:start]
        return [r for r in order if r not in self.down] + [r for r in order if r in self.down]


@dataclass
class Balanced:
    """An HTTP client of the API behind a balancer: each request to the next replica."""

    replicas: Replicas
    http: httpx.AsyncClient
    headers: dict[str, str] = field(default_factory=dict)
    retried: int = 0

    async def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        error: Exception | None = None
        headers = {**self.headers, **kwargs.pop("headers", {})}
        for base in self.replicas.pick(self.replicas.apis):
            try:
                return await self.http.request(method, base + path, headers=headers, **kwargs)
            except httpx.TransportError as e:  # that replica is gone: the next one
                error = e
                self.retried += 1
        raise FlowError(f"{method} {path}: no API replica answered ({error!r})")

    async def expect(self, status: int, method: str, path: str, **kwargs: Any) -> Any:
        r = await self.request(method, path, **kwargs)
        if r.status_code != status:
            raise FlowError(f"{method} {path}: {r.status_code} {r.text[:300]}")
        return r.json() if r.content else None

    async def wait_state(self, instance_id: str, state: str, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            body: dict[str, Any] = await self.expect(200, "GET", f"/api/instances/{instance_id}")
            if body["state"] == state:
                return body
            if body["state"] == "failed" or time.monotonic() > deadline:
                raise FlowError(
                    f"instance {body['state']} ({body.get('state_reason')}), wanted {state}"
                )
            await asyncio.sleep(POLL_SECONDS)


@dataclass
class Account:
    email: str
    password: str
    client: Balanced
    instance_id: str | None = None


async def sign_up(
    replicas: Replicas, http: httpx.AsyncClient, found: Callable[..., None]
) -> Account:
    email = f"flow-{secrets.token_hex(8)}@example.com"
    password = "correct horse battery " + secrets.token_urlsafe(12)
    found(password)
    client = Balanced(replicas, http)
    await client.expect(
        201, "POST", "/api/auth/signup", json={"email": email, "password": password}
    )
    tokens = await client.expect(
        200, "POST", "/api/auth/login", json={"email": email, "password": password}
    )
    found(tokens["access_token"], tokens["refresh_token"])
    client.headers["Authorization"] = f"Bearer {tokens['access_token']}"
    return Account(email, password, client)


async def open_channel(
    account: Account, channel: str, found: Callable[..., None], gateway: str | None = None
) -> tuple[ClientConnection, str]:
    """A one-time ticket from the API, then the gateway's WebSocket with it (through
    `gateway`, or the next live gateway replica). Returns the socket and the gateway."""
    assert account.instance_id is not None
    ticket = await account.client.expect(
        201, "POST", f"/api/instances/{account.instance_id}/tickets", json={"channel": channel}
    )
    found(ticket["ticket"])
    replicas = account.client.replicas
    last: Exception | None = None
    for base in [gateway] if gateway else replicas.pick(replicas.gateways):
        url = urllib.parse.urlsplit(ticket["url"])
        target = urllib.parse.urlunsplit(url._replace(netloc=urllib.parse.urlsplit(base).netloc))
        try:
            ws = await connect(
                target,
                origin=Origin(replicas.origin),
                subprotocols=[Subprotocol("binary")] if channel == "vnc" else None,
                open_timeout=10,
                max_size=None,
            )
        except OSError as e:
            last = e
            continue
        return ws, base
    raise FlowError(f"no gateway replica took the {channel} channel ({last!r})")


class ByteStream:
    """The relayed TCP stream, read across WebSocket message boundaries."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.buffer = bytearray()

    async def read(self, n: int) -> bytes:
        while len(self.buffer) < n:
            message = await asyncio.wait_for(self.ws.recv(), 20)
            if not isinstance(message, bytes):
                raise FlowError("the desktop channel carries binary frames only")
            self.buffer += message
        data = bytes(self.buffer[:n])
        del self.buffer[:n]
        return data


async def framebuffer_update(ws: ClientConnection, size: int = 32) -> tuple[int, int]:
    """RFB 3.8 without authentication, then one raw update of a `size` square at the
    origin. Returns the desktop's dimensions."""
    stream = ByteStream(ws)
    if await stream.read(12) != b"RFB 003.008\n":
        raise FlowError("no RFB greeting")
    await ws.send(b"RFB 003.008\n")
    (count,) = await stream.read(1)
    if 1 not in await stream.read(count):
        raise FlowError("the desktop asks for a password")
    await ws.send(b"\x01")
    if await stream.read(4) != b"\x00\x00\x00\x00":
        raise FlowError("security handshake refused")
    await ws.send(b"\x01")  # ClientInit, shared
    width, height = struct.unpack(">HH", await stream.read(4))
    bpp = (await stream.read(16))[0]
    (name_length,) = struct.unpack(">I", await stream.read(4))
    await stream.read(name_length)
    await ws.send(struct.pack(">BxHi", 2, 1, 0))  # SetEncodings: raw only
    await ws.send(struct.pack(">BBHHHH", 3, 0, 0, 0, size, size))
    msg_type, _pad, rects = struct.unpack(">BBH", await stream.read(4))
    if msg_type != 0 or rects < 1:
        raise FlowError(f"no framebuffer update (message {msg_type})")
    covered = 0
    for _ in range(rects):
        _x, _y, w, h, encoding = struct.unpack(">HHHHi", await stream.read(12))
        if encoding != 0:
            raise FlowError(f"encoding {encoding}, asked for raw")
        await stream.read(w * h * bpp // 8)
        covered += w * h
    if covered < size * size:
        raise FlowError("the update does not cover the region asked for")
    return width, height


async def talk_to_agent(ws: ClientConnection, words: str) -> None:
    hello = json.loads(await asyncio.wait_for(ws.recv(), 20))
    if hello.get("type") != "hello":
        raise FlowError(f"the agent did not say hello: {hello!r}")
    await ws.send(words)
    if await asyncio.wait_for(ws.recv(), 20) != words:
        raise FlowError("the agent did not answer")


@dataclass
class Timings:
    steps: dict[str, float] = field(default_factory=dict)

    def mark(self, step: str, since: float) -> float:
        now = time.monotonic()
        self.steps[step] = now - since
        return now


async def whole_flow(
    replicas: Replicas,
    http: httpx.AsyncClient,
    found: Callable[..., None],
    *,
    running_timeout: float = 120,
) -> Timings:
    """Every step of one user's flow; raises FlowError at the first thing that goes wrong."""
    timings = Timings()
    t = time.monotonic()
    account = await sign_up(replicas, http, found)
    key = "sk-ant-" + secrets.token_urlsafe(32)
    found(key)
    await account.client.expect(
        201, "POST", "/api/user/api-keys", json={"provider": "anthropic", "key": key}
    )
    t = timings.mark("sign up and key", t)
    created = await account.client.expect(
        202,
        "POST",
        "/api/instances",
        json={"name": "flow", "size": "small"},
        headers={"Idempotency-Key": secrets.token_hex(8)},
    )
    account.instance_id = str(created["id"])
    await account.client.wait_state(account.instance_id, "running", running_timeout)
    t = timings.mark("create to running", t)

    ws, _ = await open_channel(account, "vnc", found)
    async with ws:
        await framebuffer_update(ws)
    ws, _ = await open_channel(account, "cloudbot", found)
    async with ws:
        await talk_to_agent(ws, f"hello from {account.email}")
    t = timings.mark("desktop and agent", t)

    await account.client.expect(202, "POST", f"/api/instances/{account.instance_id}/stop")
    await account.client.wait_state(account.instance_id, "stopped", running_timeout)
    await account.client.expect(202, "DELETE", f"/api/instances/{account.instance_id}")
    await account.client.wait_state(account.instance_id, "terminated", running_timeout)
    timings.mark("stop and delete", t)
    return timings
