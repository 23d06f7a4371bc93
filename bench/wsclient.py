"""A minimal WebSocket client for load: it counts payload bytes and does nothing else.

A full client library would spend more CPU per byte than the relays under test and
measure itself. This one parses frame headers in place and only counts, so the same
client can drive the gateway, websockify and (without framing) the source directly.
"""

from __future__ import annotations

import asyncio
import base64
import os
import struct
from typing import cast

_HANDSHAKE_END = b"\r\n\r\n"


def mask_frame(payload: bytes, opcode: int = 0x2) -> bytes:
    """A client frame (clients must mask what they send)."""
    key = os.urandom(4)
    n = len(payload)
    if n < 126:
        header = struct.pack("!BB", 0x80 | opcode, 0x80 | n)
    elif n < 1 << 16:
        header = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, n)
    else:
        header = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, n)
    masked = (
        int.from_bytes(payload, "big") ^ int.from_bytes((key * (n // 4 + 1))[:n], "big")
    ).to_bytes(n, "big")
    return header + key + masked


def upgrade_request(host: str, port: int, path: str, headers: dict[str, str]) -> bytes:
    key = base64.b64encode(os.urandom(16)).decode()
    lines = [
        f"GET {path} HTTP/1.1",
        f"Host: {host}:{port}",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {key}",
        "Sec-WebSocket-Version: 13",
        "Sec-WebSocket-Protocol: binary",
        *(f"{k}: {v}" for k, v in headers.items()),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


class Counter(asyncio.Protocol):
    """Counts payload bytes from a WebSocket (framed=True) or a raw TCP stream."""

    def __init__(self, framed: bool, hello: bytes, request: bytes = b"") -> None:
        self.framed = framed
        self.hello = hello
        self.request = request
        self.bytes = 0
        self.open = asyncio.get_running_loop().create_future()
        self.closed = asyncio.get_running_loop().create_future()
        self.transport: asyncio.Transport | None = None
        self._handshaken = not framed
        self._head = bytearray()  # handshake response or a partial frame header
        self._remaining = 0  # payload bytes left in the current frame
        self._control: bytearray | None = None  # payload of a control frame being read
        self._control_opcode = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # (uvloop's transports do not subclass asyncio.Transport)
        self.transport = transport = cast(asyncio.Transport, transport)
        if self.framed:
            transport.write(self.request)
        else:
            self._opened()

    def _opened(self) -> None:
        if self.hello:
            self.say(self.hello)
        if not self.open.done():
            self.open.set_result(None)

    def say(self, data: bytes) -> None:
        """Send `data` to the source (in a frame when through a relay)."""
        assert self.transport is not None
        self.transport.write(mask_frame(data) if self.framed else data)

    def data_received(self, data: bytes) -> None:
        if not self.framed:
            self.bytes += len(data)
            return
        if not self._handshaken:
            self._head += data
            end = self._head.find(_HANDSHAKE_END)
            if end < 0:
                return
            status = bytes(self._head[:12])
            data = bytes(self._head[end + 4 :])
            self._head = bytearray()
            if b" 101" not in status:
                if not self.open.done():
                    self.open.set_exception(ConnectionError(status.decode(errors="replace")))
                assert self.transport is not None
                self.transport.close()
                return
            self._handshaken = True
            self._opened()
        self._frames(data)

    def _frames(self, data: bytes) -> None:
        i, n = 0, len(data)
        while i < n:
            if self._remaining:
                take = min(self._remaining, n - i)
                self._remaining -= take
                if self._control is None:
                    self.bytes += take
                else:
                    self._control += data[i : i + take]
                    if not self._remaining:
                        self._control_done()
                i += take
                continue
            head = self._head + data[i : i + 14] if self._head else data[i : i + 14]
            if len(head) < 2:
                self._head = bytearray(head)
                return
            length = head[1] & 0x7F
            size = 2 + (2 if length == 126 else 8 if length == 127 else 0)
            if len(head) < size:
                self._head = bytearray(head)
                return
            if length == 126:
                length = int.from_bytes(head[2:4], "big")
            elif length == 127:
                length = int.from_bytes(head[2:10], "big")
            i += size - len(self._head)
            self._head = bytearray()
            opcode = head[0] & 0x0F
            self._remaining = length
            if opcode >= 0x8:
                self._control, self._control_opcode = bytearray(), opcode
                if not length:
                    self._control_done()
            else:
                self._control = None

    def _control_done(self) -> None:
        assert self.transport is not None
        assert self._control is not None
        if self._control_opcode == 0x9:  # ping: answer, or the gateway drops us
            self.transport.write(mask_frame(bytes(self._control), opcode=0xA))
        elif self._control_opcode == 0x8:
            self.transport.close()
        self._control = None

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.open.done():
            self.open.set_exception(exc or ConnectionError("closed before opening"))
        if not self.closed.done():
            self.closed.set_result(None)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.abort()


async def open_counter(
    port: int,
    *,
    hello: bytes,
    path: str | None = None,
    headers: dict[str, str] | None = None,
) -> Counter:
    """A stream from 127.0.0.1:`port`: through a WebSocket relay when `path` is given,
    straight from the source otherwise. `hello` picks the source's mode."""
    loop = asyncio.get_running_loop()
    framed = path is not None
    request = upgrade_request("127.0.0.1", port, path, headers or {}) if path is not None else b""
    _, protocol = await loop.create_connection(
        lambda: Counter(framed, hello, request), "127.0.0.1", port
    )
    await protocol.open
    return protocol
