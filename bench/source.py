"""The TCP source every relay is pointed at (run as its own process).

The first byte a connection sends picks its behaviour: b"S" streams bytes as fast as the
reader takes them, b"P" streams at PACED_RATE bytes per second (a busy desktop), b"E"
echoes everything after it, anything else (or nothing) holds the connection open and idle,
like a VNC server with nothing to draw.

It listens twice: on one port as it is (for websockify and for reading it directly), and
on another behind a machine's gate, as the gateway meets a desktop: it answers the gate's
handshake itself (with the key in BENCH_GATE_KEY) rather than through a relay of its own,
so that the gateway's figures are not a second relay's.
"""

from __future__ import annotations

import asyncio
import hmac
import os
import sys
from typing import cast

from cloudbot_common.security import gate

CHUNK = bytes(256 * 1024)
PACED_RATE = 2_000_000
PERIOD = 0.01  # each paced connection gets a chunk every PERIOD...
PHASES = 10  # ...at its own phase, so that desktops do not all update at once
PACED_CHUNK = bytes(int(PACED_RATE * PERIOD))
_paced: list[set[Source]] = [set() for _ in range(PHASES)]
_next_phase = 0


class Source(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.mode = b""
        self.paused = False
        self.phase = -1

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # (uvloop's transports do not subclass asyncio.Transport)
        self.transport = transport = cast(asyncio.Transport, transport)
        transport.set_write_buffer_limits(high=512 * 1024)

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        if not self.mode:
            self.mode, data = data[:1], data[1:]
            if self.mode == b"S":
                self._stream()
            elif self.mode == b"P":
                global _next_phase
                self.phase = _next_phase
                _next_phase = (_next_phase + 1) % PHASES
                _paced[self.phase].add(self)
        if self.mode == b"E" and data:
            self.transport.write(data)

    def _stream(self) -> None:
        transport = self.transport
        assert transport is not None
        while not self.paused and not transport.is_closing():
            transport.write(CHUNK)

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        if self.mode == b"S":
            self._stream()

    def connection_lost(self, exc: Exception | None) -> None:
        self.paused = True
        if self.phase >= 0:
            _paced[self.phase].discard(self)


class GatedSource(Source):
    """The source past a machine's gate: the gateway proves the key first."""

    def __init__(self, key: str) -> None:
        super().__init__()
        self.key = key
        self.nonce = os.urandom(gate.NONCE_BYTES)
        self.answer = bytearray()
        self.admitted = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        cast(asyncio.Transport, transport).write(gate.GREETING + self.nonce)

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        if not self.admitted:
            self.answer += data
            size = 2 * gate.NONCE_BYTES
            if len(self.answer) < size:
                return
            theirs, presented = (
                bytes(self.answer[: gate.NONCE_BYTES]),
                self.answer[gate.NONCE_BYTES : size],
            )
            expected = gate.proof(self.key, gate.GATEWAY, self.nonce, theirs)
            if not hmac.compare_digest(bytes(presented), expected):
                self.transport.close()
                return
            self.admitted = True
            self.transport.write(gate.proof(self.key, gate.GATE, self.nonce, theirs))
            data = bytes(self.answer[size:])
            if not data:
                return
        super().data_received(data)


async def _pace() -> None:
    """One timer for every paced connection: each gets PACED_CHUNK once per PERIOD, at its
    phase, skipped while its reader is behind."""
    loop = asyncio.get_running_loop()
    next_tick, phase = loop.time(), 0
    while True:
        next_tick += PERIOD / PHASES
        await asyncio.sleep(max(0.0, next_tick - loop.time()))
        for source in _paced[phase]:
            if not source.paused and source.transport is not None:
                source.transport.write(PACED_CHUNK)
        phase = (phase + 1) % PHASES


async def main(port: int, gated_port: int, key: str) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(Source, "127.0.0.1", port, backlog=8192)
    gated = await loop.create_server(
        lambda: GatedSource(key), "127.0.0.1", gated_port, backlog=8192
    )
    pacer = asyncio.create_task(_pace())
    print("ready", flush=True)
    async with server, gated:
        await server.serve_forever()
    pacer.cancel()


if __name__ == "__main__":
    import resource

    import uvloop

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    uvloop.run(main(int(sys.argv[1]), int(sys.argv[2]), os.environ["BENCH_GATE_KEY"]))
