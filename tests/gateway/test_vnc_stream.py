"""What the desktop relay must do with the byte stream, on both of its paths (splice(2) and
copying): every byte, in order, framed right among control frames; the end of either side
passed on; binary frames only; and back-pressure towards the desktop as well as from it."""

from __future__ import annotations

import asyncio
import hashlib
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine
from websockets.asyncio.client import ClientConnection
from websockets.frames import CloseCode

from cloudbot_common.procfs import rss_bytes
from tests.support.gateway import (
    GatewayServer,
    Owner,
    add_instance,
    scrape,
    wait_closed,
    ws_connect,
)
from tests.support.waiting import eventually

MiB = 1 << 20
Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@asynccontextmanager
async def vnc_session(
    gateway: GatewayServer, db_engine: AsyncEngine, owner: Owner, desktop: Handler, **options: Any
) -> AsyncIterator[ClientConnection]:
    """A client's desktop session through `gateway`, to a TCP server standing in for the
    VNC server, whose connections `desktop` serves."""
    server = await asyncio.start_server(desktop, "127.0.0.1", 0)
    try:
        instance_id = await add_instance(
            db_engine, owner.id, vnc_port=server.sockets[0].getsockname()[1]
        )
        async with ws_connect(
            f"{gateway.ws_url}/api/instances/{instance_id}/vnc",
            additional_headers=owner.bearer,
            **options,
        ) as ws:
            yield ws
    finally:
        server.close()  # stops listening; the connection lives on until either side ends it


async def until_stalled(count: Callable[[], int], timeout: float = 30) -> None:
    """Wait until `count()` stops growing: ten looks, 50 ms apart, see the same value."""
    last, still = -1, 0
    async with asyncio.timeout(timeout):
        while still < 10:
            await asyncio.sleep(0.05)
            value = count()
            still = still + 1 if value == last else 0
            last = value


async def test_the_zero_copy_path_is_on_by_default(
    gateway: GatewayServer, copying_gateway: GatewayServer
) -> None:
    # Otherwise both halves of every relay_gateway test would run the copying path.
    assert (await scrape(gateway))[("cloudbot_gateway_zero_copy", ())] == 1
    assert (await scrape(copying_gateway))[("cloudbot_gateway_zero_copy", ())] == 0


async def test_every_byte_arrives_in_order_among_pongs_then_the_close(
    relay_gateway: GatewayServer, db_engine: AsyncEngine, owner: Owner
) -> None:
    data = random.Random(7).randbytes(24 * MiB)
    sizes = (1, 7, 125, 126, 4096, 65535, 65536, 300_000, MiB)

    async def desktop(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # Writes of every size (frame headers of every length), then the end.
        pick, i = random.Random(1), 0
        while i < len(data):
            n = pick.choice(sizes)
            writer.write(data[i : i + n])
            i += n
            await writer.drain()
        writer.close()

    received = bytearray()
    pongs = 0
    async with vnc_session(relay_gateway, db_engine, owner, desktop, ping_interval=None) as ws:

        async def ping_all_along() -> None:
            # The gateway's pongs go out between its data frames.
            nonlocal pongs
            while True:
                await (await ws.ping())
                pongs += 1

        pinger = asyncio.create_task(ping_all_along())
        try:
            async with asyncio.timeout(60):
                async for message in ws:  # ends at a normal close
                    assert isinstance(message, bytes)
                    received += message
        finally:
            pinger.cancel()
    assert len(received) == len(data)
    assert hashlib.sha256(received).digest() == hashlib.sha256(data).digest()
    assert pongs > 0
    assert ws.close_code == CloseCode.NORMAL_CLOSURE
    assert ws.close_reason == "desktop closed the connection"


async def test_a_text_frame_ends_the_session_with_1003(
    relay_gateway: GatewayServer, db_engine: AsyncEngine, owner: Owner
) -> None:
    desktop_saw_the_end = asyncio.Event()

    async def desktop(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"RFB 003.008\n")
        await reader.read()  # until the gateway lets go
        desktop_saw_the_end.set()
        writer.close()

    async with vnc_session(relay_gateway, db_engine, owner, desktop) as ws:
        assert await ws.recv() == b"RFB 003.008\n"
        await ws.send("not binary")
        await wait_closed(ws)
    assert ws.close_code == CloseCode.UNSUPPORTED_DATA
    async with asyncio.timeout(10):
        await desktop_saw_the_end.wait()


async def test_a_client_leaving_mid_stream_releases_the_desktop(
    relay_gateway: GatewayServer, db_engine: AsyncEngine, owner: Owner
) -> None:
    desktop_saw_the_end = asyncio.Event()

    async def desktop(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        chunk = bytes(MiB)
        try:
            while True:
                writer.write(chunk)
                await writer.drain()
        except ConnectionError:
            desktop_saw_the_end.set()
        finally:
            writer.close()

    opened = ("cloudbot_gateway_open_sessions", (("channel", "vnc"),))
    async with vnc_session(relay_gateway, db_engine, owner, desktop) as ws:
        for _ in range(8):
            await ws.recv()
        ws.transport.abort()  # gone mid-stream, no closing handshake
    async with asyncio.timeout(15):
        await desktop_saw_the_end.wait()
    # The session is over for the gateway too (it keeps no descriptor of it open).
    metrics: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}

    async def refresh() -> None:
        metrics.update(await scrape(relay_gateway))

    await refresh()
    async with asyncio.timeout(15):
        while metrics[opened]:
            await asyncio.sleep(0.1)
            await refresh()


async def test_a_slow_reader_stops_the_upstream_instead_of_growing_memory(
    relay_gateway: GatewayServer, db_engine: AsyncEngine, owner: Owner
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

    rss_before = rss_bytes(relay_gateway.pid)
    async with vnc_session(relay_gateway, db_engine, owner, desktop, max_queue=1) as ws:
        await ws.recv()  # read one frame, then stop reading
        await until_stalled(lambda: sent)  # the desktop is blocked
        # Only socket buffers (the kernel's, on four sockets) and the gateway's
        # bounded buffers hold what was sent; nothing like an unbounded queue.
        assert sent < 64 * MiB
        assert rss_bytes(relay_gateway.pid) - rss_before < 16 * MiB

        # Reading again lets the desktop carry on.
        blocked_at = sent
        async with asyncio.timeout(30):
            while sent < blocked_at + 32 * MiB:
                await ws.recv()
        # Leave abruptly: a polite close would wait behind megabytes still in flight.
        ws.transport.abort()
    stop.set()


async def test_a_desktop_that_stops_reading_stops_the_client_being_read(
    relay_gateway: GatewayServer, db_engine: AsyncEngine, owner: Owner
) -> None:
    reading = asyncio.Event()
    received = 0

    async def desktop(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal received
        await reading.wait()  # a desktop busy elsewhere: nothing read until told
        while data := await reader.read(MiB):
            received += len(data)
        writer.close()

    sent = 0
    chunk = bytes(MiB)
    rss_before = rss_bytes(relay_gateway.pid)
    async with vnc_session(relay_gateway, db_engine, owner, desktop, write_limit=MiB) as ws:
        done = asyncio.Event()

        async def send_until_done() -> None:
            nonlocal sent
            while not done.is_set():
                await ws.send(chunk)  # blocks once the gateway stops reading us
                sent += len(chunk)

        sender = asyncio.create_task(send_until_done())
        try:
            await until_stalled(lambda: sent)  # the client is blocked
            assert sent < 64 * MiB
            assert rss_bytes(relay_gateway.pid) - rss_before < 16 * MiB

            # The desktop reads again: the client carries on, and nothing is lost.
            reading.set()
            target = sent + 32 * MiB
            await eventually(lambda: sent >= target, 30, "the client to send again")
        finally:
            done.set()
            async with asyncio.timeout(30):
                await sender
        await eventually(lambda: received == sent, 30, "every byte sent to reach the desktop")
