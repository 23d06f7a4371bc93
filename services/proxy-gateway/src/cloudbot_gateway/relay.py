"""What both relays share, and the agent relay: WebSocket <-> WebSocket.

The agent channel carries messages, not a byte stream: text and binary frames keep their
type, and close codes are passed on both ways. It runs two pumps, one per direction, and
waits for the first of them (or a stop request) to finish, then cancels the other and
closes both ends. Flow control is websockets' own: a pump does not receive while its send
is blocked, and each connection bounds its queue (`max_queue`) and write buffer
(`write_limit`). Nothing is logged per message; counters are plain ints on the session.
(The desktop relay, which carries far more bytes, works differently: see `vnc`.)
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any, Protocol

from websockets.asyncio.client import ClientConnection, connect
from websockets.asyncio.connection import Connection
from websockets.asyncio.server import ServerConnection
from websockets.frames import CloseCode
from websockets.protocol import State

from cloudbot_common.instance_contract import AGENT_AUTH_HEADER, AGENT_WS_PATH
from cloudbot_common.security.gate import connect_through_gate

if TYPE_CHECKING:
    from cloudbot_gateway.connection import GatewayConnection
    from cloudbot_gateway.sessions import Session

# Write limit of every socket the gateway writes to the instance on (VNC and agent).
UPSTREAM_WRITE_LIMIT = 64 * 1024
# Frames a WebSocket peer may have queued before we stop reading it (client and agent).
MAX_QUEUE = 4


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


class AgentUpstream:
    """The agent's WebSocket: a session's `Upstream` on the agent channel."""

    def __init__(self, agent: ClientConnection) -> None:
        self.agent = agent

    def bind(self, client: GatewayConnection, session: Session) -> None:
        """Nothing to pair: messages flow once the handshake is done (`relay`)."""

    async def relay(self, client: GatewayConnection, session: Session) -> str:
        return await relay_agent(client, self.agent, session, session.stop)

    def abandon(self) -> None:
        self.agent.transport.abort()


async def open_agent(
    host: str,
    port: int,
    credential: str,
    *,
    connect_timeout: float,
    max_size: int,
    logger: Any,
) -> AgentUpstream:
    """The agent's own WebSocket, through the machine's gate, with the instance's agent
    credential presented by us (to the gate as a proof, to the agent as a bearer)."""
    async with asyncio.timeout(connect_timeout):
        sock = await connect_through_gate(host, port, credential)
    try:
        agent = await connect(
            f"ws://{host}:{port}{AGENT_WS_PATH}",
            sock=sock,
            additional_headers={AGENT_AUTH_HEADER: f"Bearer {credential}"},
            user_agent_header=None,
            compression=None,
            proxy=None,
            open_timeout=connect_timeout,
            max_size=max_size,
            max_queue=MAX_QUEUE,
            write_limit=UPSTREAM_WRITE_LIMIT,
            ping_interval=30,
            ping_timeout=30,
            close_timeout=5,
            logger=logger,
        )
    except BaseException:
        sock.close()
        raise
    return AgentUpstream(agent)


# --- Agent: WebSocket <-> WebSocket, frames and close codes passed through ---------------


async def _pump(src: Connection, dst: Connection, meter: Meter, *, up: bool) -> None:
    async for message in src:
        # Text frames count their characters: the same as bytes for the usual ASCII JSON.
        if up:
            meter.bytes_up += len(message)
        else:
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
        first = await _run_pumps(
            _pump(ws, agent, meter, up=True), _pump(agent, ws, meter, up=False), stop
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
) -> str:
    """Run both pumps until one ends or `stop` is set, then cancel the rest.

    Returns which finished first: _UP, _DOWN or _STOP.
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
    # Retrieve the pumps' exceptions, so that none is reported as never retrieved; how the
    # session ended is read from the connections' close states instead.
    for task in (up_task, down_task):
        if not task.cancelled():
            task.exception()
    if stop.done():
        return _STOP
    return _UP if up_task.done() and not up_task.cancelled() else _DOWN
