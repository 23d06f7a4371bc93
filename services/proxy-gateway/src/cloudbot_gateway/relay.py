"""The hot path: moving bytes between a client's WebSocket and the instance.

Each session runs two pumps, one per direction, and waits for the first of them (or a
stop request) to finish, then cancels the other and closes both ends. Nothing is logged
or allocated per frame beyond the chunk the kernel handed us; counters are plain ints on
the session. Flow control is end to end: a pump does not read its source while the write
to its sink is blocked, so a slow reader slows the upstream read instead of growing memory.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Coroutine
from typing import Any, Protocol, cast

from websockets.asyncio.client import ClientConnection, connect
from websockets.asyncio.connection import Connection
from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed
from websockets.frames import CloseCode
from websockets.protocol import State

from cloudbot_common.instance_contract import AGENT_AUTH_HEADER, AGENT_WS_PATH

# Bytes buffered from the upstream socket before it stops being read (one uvloop read is
# up to 256 KiB). With the client's `write_limit` this bounds a session's buffering.
UPSTREAM_HIGH_WATER = 256 * 1024
UPSTREAM_WRITE_LIMIT = 64 * 1024


class Meter(Protocol):
    """What a relay reports to: its session's byte counters."""

    bytes_up: int
    bytes_down: int


class Stop(Exception):
    """Why a session was ended from outside (state change, logout, idle, shutdown)."""

    def __init__(self, code: int, reason: str, cause: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason
        self.cause = cause


class TcpUpstream(asyncio.Protocol):
    """A TCP connection read chunk by chunk, with reading paused while a chunk waits.

    Lighter than StreamReader: chunks are handed over as the transport delivered them,
    without copying them through an intermediate buffer.
    """

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self._chunks: deque[bytes] = deque()
        self._buffered = 0
        self._eof = False
        self._error: Exception | None = None
        self._read_waiter: asyncio.Future[None] | None = None
        self._reading_paused = False
        self._write_paused = False
        self._drain_waiter: asyncio.Future[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's TCP transport has every asyncio.Transport method but does not subclass
        # it, so an isinstance check would refuse every upstream under `cloudbot-gateway`.
        self.transport = cast(asyncio.Transport, transport)
        self.transport.set_write_buffer_limits(UPSTREAM_WRITE_LIMIT)

    def data_received(self, data: bytes) -> None:
        self._chunks.append(data)
        self._buffered += len(data)
        if self._buffered >= UPSTREAM_HIGH_WATER and not self._reading_paused:
            assert self.transport is not None
            self.transport.pause_reading()
            self._reading_paused = True
        self._wake_reader()

    def eof_received(self) -> bool:
        self._eof = True
        self._wake_reader()
        return False  # close our side too: a VNC session is over when the server ends it

    def connection_lost(self, exc: Exception | None) -> None:
        self._eof = True
        self._error = exc
        self._wake_reader()
        waiter, self._drain_waiter = self._drain_waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        waiter, self._drain_waiter = self._drain_waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _wake_reader(self) -> None:
        waiter, self._read_waiter = self._read_waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def read(self) -> bytes:
        """Everything received so far (at least one byte), or b"" at end of stream."""
        while not self._chunks:
            if self._eof:
                if self._error is not None:
                    raise self._error
                return b""
            self._read_waiter = asyncio.get_running_loop().create_future()
            await self._read_waiter
        chunks = self._chunks
        data = chunks.popleft() if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        self._buffered = 0
        if self._reading_paused:
            self._reading_paused = False
            assert self.transport is not None
            self.transport.resume_reading()
        return data

    def write(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)

    @property
    def must_drain(self) -> bool:
        return self._write_paused

    async def drain(self) -> None:
        if self._write_paused and not self._eof:
            self._drain_waiter = asyncio.get_running_loop().create_future()
            await self._drain_waiter
        if self._eof:
            raise ConnectionResetError("upstream closed")

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


async def open_tcp(host: str, port: int, connect_timeout: float) -> TcpUpstream:
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(connect_timeout):
        _, upstream = await loop.create_connection(TcpUpstream, host, port)
    return upstream


async def open_agent(
    host: str,
    port: int,
    credential: str,
    *,
    connect_timeout: float,
    max_size: int,
    logger: Any,
) -> ClientConnection:
    """The agent's own WebSocket, with the instance's agent credential presented by us."""
    return await connect(
        f"ws://{host}:{port}{AGENT_WS_PATH}",
        additional_headers={AGENT_AUTH_HEADER: f"Bearer {credential}"},
        user_agent_header=None,
        compression=None,
        proxy=None,
        open_timeout=connect_timeout,
        max_size=max_size,
        max_queue=4,
        write_limit=UPSTREAM_WRITE_LIMIT,
        ping_interval=30,
        ping_timeout=30,
        close_timeout=5,
        logger=logger,
    )


# --- VNC: binary WebSocket <-> TCP, like websockify -----------------------------------


async def _ws_to_tcp(ws: ServerConnection, upstream: TcpUpstream, meter: Meter) -> None:
    async for message in ws:
        if isinstance(message, str):
            raise Stop(CloseCode.UNSUPPORTED_DATA, "binary frames only", "protocol")
        upstream.write(message)
        meter.bytes_up += len(message)
        if upstream.must_drain:
            await upstream.drain()


async def _tcp_to_ws(upstream: TcpUpstream, ws: ServerConnection, meter: Meter) -> None:
    read, send = upstream.read, ws.send
    while data := await read():
        meter.bytes_down += len(data)
        await send(data)


async def relay_vnc(
    ws: ServerConnection, upstream: TcpUpstream, meter: Meter, stop: asyncio.Future[Stop]
) -> str:
    """Relay until either end closes or `stop` is set. Returns why the session ended."""
    try:
        first, error = await _run_pumps(
            _ws_to_tcp(ws, upstream, meter), _tcp_to_ws(upstream, ws, meter), stop
        )
    finally:
        upstream.close()
    if first is _STOP:
        ended = stop.result()
        await ws.close(ended.code, ended.reason)
        return ended.cause
    if isinstance(error, Stop):
        await ws.close(error.code, error.reason)
        return error.cause
    if isinstance(error, ConnectionClosed):
        return "client"
    if first is _DOWN and error is None:
        await ws.close(CloseCode.NORMAL_CLOSURE, "desktop closed the connection")
        return "upstream"
    if error is not None:
        # Reading from or writing to the desktop failed: it went away.
        await ws.close(CloseCode.BAD_GATEWAY, "desktop connection lost")
        return "upstream_error"
    return "client"


# --- Agent: WebSocket <-> WebSocket, frames and close codes passed through ---------------


async def _ws_to_ws_up(src: Connection, dst: Connection, meter: Meter) -> None:
    async for message in src:
        meter.bytes_up += len(message)
        await dst.send(message)


async def _ws_to_ws_down(src: Connection, dst: Connection, meter: Meter) -> None:
    async for message in src:
        meter.bytes_down += len(message)
        await dst.send(message)


def _passable(code: int | None, fallback: int) -> int:
    """A close code one end sent, as one we may send the other end (1005, 1006 and 1015
    only describe what happened and may not be sent)."""
    if code is None or code == CloseCode.NO_STATUS_RCVD:
        return CloseCode.NORMAL_CLOSURE
    if code in (CloseCode.ABNORMAL_CLOSURE, CloseCode.TLS_HANDSHAKE):
        return fallback
    return code


async def relay_agent(
    ws: ServerConnection, agent: ClientConnection, meter: Meter, stop: asyncio.Future[Stop]
) -> str:
    """Relay until either end closes or `stop` is set. Returns why the session ended."""
    try:
        first, _ = await _run_pumps(
            _ws_to_ws_up(ws, agent, meter), _ws_to_ws_down(agent, ws, meter), stop
        )
        if first is _STOP:
            ended = stop.result()
            await asyncio.gather(
                ws.close(ended.code, ended.reason),
                agent.close(CloseCode.GOING_AWAY, "session ended by the gateway"),
            )
            return ended.cause
        # Whichever end closed first, the other gets its close code and reason.
        client_closed = ws.protocol.close_rcvd is not None
        agent_closed = agent.protocol.close_rcvd is not None
        if client_closed or (first is _UP and not agent_closed):
            code = _passable(ws.close_code, CloseCode.GOING_AWAY)
            await agent.close(code, ws.close_reason or "")
            return "client"
        code = _passable(agent.close_code, CloseCode.BAD_GATEWAY)
        await ws.close(code, agent.close_reason or "")
        return "upstream_error" if code == CloseCode.BAD_GATEWAY else "upstream"
    finally:
        # Never leave the agent connection behind, whatever happened above.
        if agent.protocol.state is not State.CLOSED:
            agent.transport.abort()


_UP, _DOWN, _STOP = "up", "down", "stop"


async def _run_pumps(
    up: Coroutine[Any, Any, None],
    down: Coroutine[Any, Any, None],
    stop: asyncio.Future[Stop],
) -> tuple[str, BaseException | None]:
    """Run both pumps until one ends or `stop` is set, then cancel the rest.

    Returns which finished first (_UP, _DOWN or _STOP) and the exception that ended that
    pump, if any.
    """
    up_task = asyncio.create_task(up)
    down_task = asyncio.create_task(down)
    try:
        await asyncio.wait((up_task, down_task, stop), return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (up_task, down_task):
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
    if stop.done():
        return _STOP, None
    if up_task.done() and not up_task.cancelled():
        first, task = _UP, up_task
    else:
        first, task = _DOWN, down_task
    if task.cancelled():
        return first, None
    # Retrieve the other's exception too, so that none is reported as never retrieved.
    for other in (up_task, down_task):
        if not other.cancelled():
            other.exception()
    return first, task.exception()
