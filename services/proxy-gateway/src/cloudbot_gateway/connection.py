"""The client's side of a session: its WebSocket connection to the gateway."""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from websockets.asyncio.server import ServerConnection
from websockets.frames import CloseCode, Frame, Opcode
from websockets.protocol import State

from cloudbot_gateway.relay import Stop
from cloudbot_gateway.zerocopy import SpliceSender

if TYPE_CHECKING:
    from cloudbot_gateway.sessions import Session

_OPEN = State.OPEN
_BINARY, _CONT, _TEXT = Opcode.BINARY, Opcode.CONT, Opcode.TEXT


class FrameSink(Protocol):
    """Takes a client's frames straight from the parser (see `vnc`)."""

    def from_client(self, data: bytes | bytearray | memoryview) -> None: ...

    def fail(self, stop: Stop) -> None: ...

    def client_drained(self) -> None:
        """The client's transport wrote out what it had queued."""


class GatewayConnection(ServerConnection):
    """A client's WebSocket, carrying the session its upgrade request was granted.

    Every client connection is one of these, whatever its channel: the channel is known
    only once the request is read. An upstream that relays raw bytes (the desktop) takes
    the client's binary frames as they are parsed, by setting itself as `frames`; an
    upstream that relays messages (the agent) reads them with `recv` as usual.
    """

    session: Session | None = None
    frames: FrameSink | None = None
    # Writes everything to the client while a zero-copy relay runs (see `zerocopy`).
    sender: SpliceSender | None = None

    def process_event(self, event: object) -> None:
        sink = self.frames
        if sink is not None and isinstance(event, Frame):
            opcode = event.opcode
            if opcode is _BINARY or opcode is _CONT:
                sink.from_client(event.data)
                return
            if opcode is _TEXT:
                sink.fail(Stop(CloseCode.UNSUPPORTED_DATA, "binary frames only", "protocol"))
                return
        super().process_event(event)  # type: ignore[arg-type]

    def resume_writing(self) -> None:
        super().resume_writing()
        if self.frames is not None:
            self.frames.client_drained()

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
