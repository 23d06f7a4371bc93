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
from typing import cast

from websockets.asyncio.server import ServerConnection
from websockets.frames import CloseCode, Frame, Opcode
from websockets.protocol import State

from cloudbot_gateway.relay import UPSTREAM_WRITE_LIMIT, Meter, Stop
from cloudbot_gateway.zerocopy import SpliceSender, frame_header

# The client's socket write limit; above it we stop reading the VNC server.
CLIENT_WRITE_LIMIT = 64 * 1024
# At most this much is read from the VNC server at once, and sent as one frame.
READ_SIZE = 256 * 1024

_OPEN = State.OPEN
_BINARY, _CONT, _TEXT = Opcode.BINARY, Opcode.CONT, Opcode.TEXT


class VncConnection(ServerConnection):
    """A client WebSocket whose binary frames can go straight to a TCP upstream."""

    upstream: TcpUpstream | None = None
    # Writes everything to the client while a zero-copy relay runs (see `zerocopy`).
    sender: SpliceSender | None = None

    def process_event(self, event: object) -> None:
        upstream = self.upstream
        if upstream is not None and isinstance(event, Frame):
            opcode = event.opcode
            if opcode is _BINARY or opcode is _CONT:
                upstream.from_client(event.data)
                return
            if opcode is _TEXT:
                upstream.fail(Stop(CloseCode.UNSUPPORTED_DATA, "binary frames only", "protocol"))
                return
        super().process_event(event)  # type: ignore[arg-type]

    def resume_writing(self) -> None:
        super().resume_writing()
        if self.upstream is not None:
            self.upstream.client_drained()

    def send_data(self) -> None:
        sender = self.sender
        if sender is None:
            super().send_data()
            return
        for data in self.protocol.data_to_send():
            if data:
                sender.send(data)
            else:
                sender.send_eof()
        if self.protocol.state is not _OPEN:
            sender.stop_reading()  # no data frame may follow a close frame

    def connection_lost(self, exc: Exception | None) -> None:
        if self.sender is not None:
            self.sender.close()
        super().connection_lost(exc)


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


class TcpUpstream(asyncio.BufferedProtocol):
    """The TCP connection to the VNC server, relaying to and from one VncConnection."""

    transport: asyncio.Transport
    # Set by attach(), before any byte is relayed.
    client: VncConnection
    meter: Meter

    def __init__(self, zero_copy: bool = False) -> None:
        self.zero_copy = zero_copy
        self.flowing = False
        self.ended: asyncio.Future[Exception | None] = asyncio.get_running_loop().create_future()
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

    def attach(self, client: VncConnection, meter: Meter) -> None:
        """Pair with the client connection whose upgrade request was granted."""
        self.client, self.meter = client, meter
        client.upstream = self

    def start(self) -> None:
        """The handshake is done: flush what the VNC server said meanwhile, then flow."""
        self.flowing = True
        early, self._early = self._early, []
        client = self.client
        # The sender writes to the client's socket itself: only when the transport has
        # nothing left to write (it always has, bar the rarest handshake).
        if self.zero_copy and not client.transport.get_write_buffer_size():
            self._pause_reading()  # for good: the sender reads this socket from now on
            sender = SpliceSender(
                _fileno(client.transport),
                _fileno(self.transport),
                self.meter,
                upstream_ended=self._end,
                client_failed=client.transport.abort,
            )
            client.sender = sender
            for chunk in early:
                self.meter.bytes_down += len(chunk)
                sender.send(frame_header(len(chunk)) + chunk)
            sender.start()
            return
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
        if self.client.sender is None:
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

    def fail(self, stop: Stop) -> None:
        self._end(stop)

    def eof_received(self) -> bool:
        return False  # the VNC server ended the session: close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self._end(exc)

    def _end(self, outcome: Exception | None) -> None:
        if not self.ended.done():
            self.ended.set_result(outcome)

    def close(self) -> None:
        self.transport.close()


def _fileno(transport: asyncio.BaseTransport) -> int:
    fileno: int = transport.get_extra_info("socket").fileno()
    return fileno


async def open_tcp(
    host: str, port: int, connect_timeout: float, *, zero_copy: bool = False
) -> TcpUpstream:
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(connect_timeout):
        _, upstream = await loop.create_connection(lambda: TcpUpstream(zero_copy), host, port)
    return upstream


async def relay_vnc(
    client: VncConnection, upstream: TcpUpstream, stop: asyncio.Future[Stop]
) -> str:
    """Relay until either end closes or `stop` is set. Returns why the session ended."""
    upstream.start()
    client_gone = client.connection_lost_waiter
    try:
        await asyncio.wait((upstream.ended, client_gone, stop), return_when=asyncio.FIRST_COMPLETED)
    finally:
        client.upstream = None
        if client.sender is not None:
            client.sender.stop_reading()
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
