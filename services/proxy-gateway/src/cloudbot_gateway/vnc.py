"""The desktop relay: binary WebSocket frames <-> the VNC server's TCP stream, like
websockify. This is the hot path: every desktop frame crosses it.

On Linux the desktop's bytes go to the client without being copied at all (`zerocopy`,
splice(2)); that is the default, and what follows is the portable path it replaces for
that direction (settings: GATEWAY_ZERO_COPY). The client's bytes to the desktop, a
trickle of input events, always take the path below.

Bytes are moved in the transports' own callbacks rather than by pump tasks awaiting
`recv()` and `send()`. A chunk read from the VNC server is framed and written to the
client in the same callback that received it, and a frame from the client is written
upstream in the callback that parsed it. That saves two task switches and an event loop
pass per hop. Chunks are read into one process-wide buffer and written as a frame header
plus a view of that buffer (`writelines`), so while the client keeps up nothing but the
small frame header is allocated per chunk, and nothing is copied; what remains is the
kernel's two copies (README, Performance). A chunk that must queue behind earlier data
is copied (only its own bytes), so a lagging client never pins read buffers.

Flow control is end to end: while the client's socket is above its write limit, the VNC
server's socket is not read; while the VNC server's socket is above its limit, the
client's is not read. A slow reader slows the desktop down instead of growing memory;
a session holds at most one read chunk plus the transports' write limits.

The two ends are attached as soon as the upgrade request is granted, so nothing the
client sends after the handshake can miss the relay. Until the session starts, what the
VNC server says (it speaks first) is held and its socket not read; `relay_vnc` flushes it
and lets bytes flow.
"""

from __future__ import annotations

import asyncio
import socket
from collections import deque
from typing import cast

from websockets.frames import CloseCode
from websockets.protocol import State

from cloudbot_common.security.gate import connect_through_gate
from cloudbot_gateway.connection import GatewayConnection
from cloudbot_gateway.relay import UPSTREAM_WRITE_LIMIT, Meter, Stop
from cloudbot_gateway.sessions import Session
from cloudbot_gateway.zerocopy import SpliceSender, frame_header

# The client's socket write limit; above it we stop reading the VNC server.
CLIENT_WRITE_LIMIT = 64 * 1024
# At most this much is read from the VNC server at once, and sent as one frame.
READ_SIZE = 1024 * 1024

_OPEN = State.OPEN


class _ReadBuffer:
    """The one buffer every upstream socket of the process is read into.

    A read chunk is framed and written to its client before the next read of any socket,
    so one buffer serves them all: no allocation and no copy per chunk. The exception is
    a write the client's socket cannot take at once: the transport then keeps a view of
    the unsent part, so the buffer is handed over to it and a new one made.
    """

    def __init__(self) -> None:
        self.buffer = bytearray(READ_SIZE)
        self.view = memoryview(self.buffer)

    def renew(self) -> None:
        self.buffer = bytearray(READ_SIZE)
        self.view = memoryview(self.buffer)


_read_buffer: _ReadBuffer | None = None


def _shared_buffer() -> _ReadBuffer:
    global _read_buffer
    if _read_buffer is None:
        _read_buffer = _ReadBuffer()
    return _read_buffer


class DesktopUpstream:
    """The TCP connection to the VNC server, relaying to and from one client connection:
    a session's `Upstream` on the desktop channel. It takes the client's binary frames
    as they are parsed (the connection's `frames`)."""

    # Set by bind(), before any byte is relayed.
    client: GatewayConnection
    meter: Meter

    def __init__(self) -> None:
        self.ended: asyncio.Future[Exception | None] = asyncio.get_running_loop().create_future()

    def bind(self, client: GatewayConnection, session: Session) -> None:
        """Pair with the client connection whose upgrade request was granted."""
        self.client, self.meter = client, session
        client.frames = self

    async def relay(self, client: GatewayConnection, session: Session) -> str:
        return await relay_vnc(client, self, session.stop)

    def abandon(self) -> None:
        self.close()

    def start(self) -> None:
        """The handshake is done: let bytes flow."""
        raise NotImplementedError

    def from_client(self, data: bytes | bytearray | memoryview) -> None:
        raise NotImplementedError

    def client_drained(self) -> None:
        """The client's transport wrote out what it had queued."""

    def fail(self, stop: Stop) -> None:
        self._end(stop)

    def _end(self, outcome: Exception | None) -> None:
        if not self.ended.done():
            self.ended.set_result(outcome)

    def close(self) -> None:
        raise NotImplementedError


class TcpUpstream(DesktopUpstream, asyncio.BufferedProtocol):
    """The copying relay: the VNC server's socket read through its transport."""

    transport: asyncio.Transport

    def __init__(self) -> None:
        super().__init__()
        self.flowing = False
        self._buffer = _shared_buffer()
        self._early: list[bytes] = []
        self._reading_paused = False
        self._client_paused = False

    # --- set-up ----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's TCP transport has every asyncio.Transport method but does not subclass
        # it, so no isinstance check here.
        self.transport = cast(asyncio.Transport, transport)
        # Above this we stop reading the client.
        self.transport.set_write_buffer_limits(UPSTREAM_WRITE_LIMIT)

    def start(self) -> None:
        """Flush what the VNC server said during the handshake, then flow."""
        self.flowing = True
        early, self._early = self._early, []
        for chunk in early:
            self._to_client(chunk)
        if not self.client.paused:
            self._resume_reading()

    # --- VNC server -> client --------------------------------------------------------

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._buffer.view

    def buffer_updated(self, nbytes: int) -> None:
        chunk = self._buffer.view[:nbytes]
        if not self.flowing:
            self._early.append(bytes(chunk))
            self._pause_reading()
            return
        self._to_client(chunk)
        if self.client.paused:
            self._pause_reading()  # until client_drained()

    def _to_client(self, data: bytes | memoryview) -> None:
        client = self.client
        if client.protocol.state is not _OPEN:
            return  # closing: the relay is ending, the rest has nowhere to go
        n = len(data)
        self.meter.bytes_down += n
        transport = client.transport
        if transport.get_write_buffer_size():
            # Queued behind earlier data, this chunk will be kept by the transport: give it
            # a copy of just these bytes, not a view that pins the whole shared buffer.
            transport.writelines((frame_header(n), bytes(data)))
            return
        transport.writelines((frame_header(n), data))
        if transport.get_write_buffer_size() and isinstance(data, memoryview):
            # Partly sent into an empty buffer: the transport keeps the view, so the next
            # reads go to a fresh buffer.
            self._buffer.renew()

    def client_drained(self) -> None:
        self._resume_reading()

    def _pause_reading(self) -> None:
        if not self._reading_paused:
            self._reading_paused = True
            self.transport.pause_reading()

    def _resume_reading(self) -> None:
        if self._reading_paused:
            self._reading_paused = False
            self.transport.resume_reading()

    # --- client -> VNC server --------------------------------------------------------

    def from_client(self, data: bytes | bytearray | memoryview) -> None:
        if type(data) is not bytes:
            data = bytes(data)  # a transport may hold on to what it is given
        self.meter.bytes_up += len(data)
        self.transport.write(data)  # calls pause_writing() when over the limit

    def pause_writing(self) -> None:
        if not self._client_paused:
            self._client_paused = True
            self.client.transport.pause_reading()

    def resume_writing(self) -> None:
        if self._client_paused:
            self._client_paused = False
            self.client.transport.resume_reading()

    # --- the end ---------------------------------------------------------------------

    def eof_received(self) -> bool:
        return False  # the VNC server ended the session: close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self._end(exc)

    def close(self) -> None:
        self.transport.close()


class SpliceUpstream(DesktopUpstream):
    """The zero-copy relay (`zerocopy`): the VNC server's socket, owned outright rather
    than by a transport, so that its bytes can be spliced. Until the handshake is done it
    is simply not read: what the VNC server says first waits in the kernel."""

    def __init__(self, sock: socket.socket) -> None:
        super().__init__()
        self.sock = sock
        self._loop = asyncio.get_running_loop()
        self._sender: SpliceSender | None = None
        # What the client sent that the VNC server's socket has not taken yet.
        self._pending: deque[bytes] = deque()
        self._pending_size = 0
        self._client_paused = False

    def start(self) -> None:
        client = self.client
        self._sender = client.sender = SpliceSender(
            client.transport,
            self.sock.fileno(),
            self.meter,
            upstream_ended=self._end,
            client_failed=client.transport.abort,
        )
        self._sender.start()

    # --- client -> VNC server (a trickle of input events) ------------------------------

    def from_client(self, data: bytes | bytearray | memoryview) -> None:
        self.meter.bytes_up += len(data)
        if not self._pending:
            try:
                sent = self.sock.send(data)
            except BlockingIOError:
                sent = 0
            except OSError as exc:
                self._end(exc)
                return
            if sent == len(data):
                return
            data = data[sent:]
            self._loop.add_writer(self.sock.fileno(), self._flush)
        self._pending.append(bytes(data))
        self._pending_size += len(data)
        if self._pending_size > UPSTREAM_WRITE_LIMIT and not self._client_paused:
            self._client_paused = True
            self.client.transport.pause_reading()

    def _flush(self) -> None:
        pending = self._pending
        try:
            while pending:
                sent = self.sock.send(pending[0])
                self._pending_size -= sent
                if sent < len(pending[0]):
                    pending[0] = pending[0][sent:]
                    break
                pending.popleft()
        except BlockingIOError:
            pass
        except OSError as exc:
            self._loop.remove_writer(self.sock.fileno())
            self._end(exc)
            return
        if not pending:
            self._loop.remove_writer(self.sock.fileno())
        if self._client_paused and self._pending_size <= UPSTREAM_WRITE_LIMIT // 4:
            self._client_paused = False
            self.client.transport.resume_reading()

    def close(self) -> None:
        if self.sock.fileno() < 0:
            return
        if self._sender is not None:
            self._sender.stop_reading()
        if self._pending:
            self._loop.remove_writer(self.sock.fileno())
        self.sock.close()


async def open_tcp(
    host: str, port: int, gate_key: str, connect_timeout: float, *, zero_copy: bool = False
) -> DesktopUpstream:
    """Connect to the VNC server through the machine's gate (`gate_key`: the instance's
    agent credential); `zero_copy` relays it with splice(2). Past the gate the socket
    carries the VNC server's plain bytes, so either relay takes it as it is."""
    async with asyncio.timeout(connect_timeout):
        sock = await connect_through_gate(host, port, gate_key)
        if zero_copy:
            return SpliceUpstream(sock)
        try:
            _, upstream = await asyncio.get_running_loop().create_connection(TcpUpstream, sock=sock)
        except BaseException:
            sock.close()
            raise
    return upstream


async def relay_vnc(
    client: GatewayConnection, upstream: DesktopUpstream, stop: asyncio.Future[Stop]
) -> str:
    """Relay until either end closes or `stop` is set. Returns why the session ended."""
    upstream.start()
    client_gone = client.connection_lost_waiter
    try:
        await asyncio.wait((upstream.ended, client_gone, stop), return_when=asyncio.FIRST_COMPLETED)
    finally:
        client.frames = None
        upstream.close()
    if stop.done():
        ended = stop.result()
    elif client_gone.done():
        return "client"
    else:
        outcome = upstream.ended.result()
        if isinstance(outcome, Stop):
            ended = outcome
        elif outcome is None:
            ended = Stop(CloseCode.NORMAL_CLOSURE, "desktop closed the connection", "upstream")
        else:
            ended = Stop(CloseCode.BAD_GATEWAY, "desktop connection lost", "upstream_error")
    await client.close(ended.code, ended.reason)
    return ended.cause
