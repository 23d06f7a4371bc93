"""Bounded buffering: a client that stops reading stops the desktop being read, instead of
the gateway holding what the desktop keeps sending."""

from __future__ import annotations

import asyncio
from pathlib import Path

from sqlalchemy.ext.asyncio import AsyncEngine

from tests.gateway.conftest import GatewayServer, Owner, add_instance, ws_connect

MiB = 1 << 20


def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


async def test_a_slow_reader_stops_the_upstream_instead_of_growing_memory(
    gateway: GatewayServer, db: AsyncEngine, owner: Owner
) -> None:
    sent = 0
    stop = asyncio.Event()

    async def desktop(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal sent
        chunk = bytes(MiB)
        try:
            while not stop.is_set():
                writer.write(chunk)
                await writer.drain()  # blocks once the gateway stops reading
                sent += len(chunk)
        except ConnectionError:
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(desktop, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    instance_id = await add_instance(db, owner.id, vnc_port=port)
    rss_before = _rss(gateway.pid)
    try:
        async with ws_connect(
            f"{gateway.ws_url}/api/instances/{instance_id}/vnc",
            additional_headers=owner.bearer,
            max_queue=1,
        ) as ws:
            await ws.recv()  # read one frame, then stop reading
            # Wait until the desktop is blocked: what it has sent stops growing.
            last, still = -1, 0
            async with asyncio.timeout(30):
                while still < 10:
                    await asyncio.sleep(0.05)
                    still = still + 1 if sent == last else 0
                    last = sent
            # Only socket buffers (the kernel's, on four sockets) and the gateway's
            # bounded buffers hold what was sent; nothing like an unbounded queue.
            assert sent < 64 * MiB
            assert _rss(gateway.pid) - rss_before < 16 * MiB

            # Reading again lets the desktop carry on.
            blocked_at = sent
            async with asyncio.timeout(30):
                while sent < blocked_at + 32 * MiB:
                    await ws.recv()
            # Leave abruptly: a polite close would wait behind megabytes still in flight.
            ws.transport.abort()
    finally:
        stop.set()
        server.close()
