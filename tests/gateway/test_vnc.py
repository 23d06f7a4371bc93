"""A real desktop behind the gateway: the RFB handshake and a framebuffer update."""

from __future__ import annotations

import struct
from typing import Literal

import httpx
from sqlalchemy.ext.asyncio import AsyncEngine
from websockets.asyncio.client import ClientConnection

from tests.support.flow import ByteStream
from tests.support.gateway import (
    ORIGIN,
    Desktop,
    GatewayServer,
    Owner,
    add_instance,
    ticket_for,
    ws_connect,
)


async def rfb_session(ws: ClientConnection, desktop: Desktop) -> None:
    """RFB 3.8 with no authentication, then one full raw framebuffer update, checked red."""
    stream = ByteStream(ws)
    assert await stream.read(12) == b"RFB 003.008\n"
    await ws.send(b"RFB 003.008\n")
    (count,) = await stream.read(1)
    assert 1 in await stream.read(count), "x11vnc -nopw offers security type None"
    await ws.send(b"\x01")
    assert await stream.read(4) == b"\x00\x00\x00\x00"  # SecurityResult OK
    await ws.send(b"\x01")  # ClientInit, shared
    width, height = struct.unpack(">HH", await stream.read(4))
    assert (width, height) == (desktop.width, desktop.height)
    pixel_format = await stream.read(16)
    bpp, _depth, big_endian, _true = pixel_format[:4]
    red_max, _g, _b = struct.unpack(">HHH", pixel_format[4:10])
    red_shift = pixel_format[10]
    (name_length,) = struct.unpack(">I", await stream.read(4))
    await stream.read(name_length)

    await ws.send(struct.pack(">BxHi", 2, 1, 0))  # SetEncodings: raw only
    await ws.send(struct.pack(">BBHHHH", 3, 0, 0, 0, width, height))  # full update request
    msg_type, _pad, rects = struct.unpack(">BBH", await stream.read(4))
    assert msg_type == 0  # FramebufferUpdate
    assert rects >= 1
    covered = red = 0
    for _ in range(rects):
        _x, _y, w, h, encoding = struct.unpack(">HHHHi", await stream.read(12))
        assert encoding == 0
        pixels = await stream.read(w * h * bpp // 8)
        size = bpp // 8
        order: Literal["big", "little"] = "big" if big_endian else "little"
        values = (int.from_bytes(pixels[i : i + size], order) for i in range(0, len(pixels), size))
        red += sum(1 for v in values if (v >> red_shift) & red_max == red_max)
        covered += w * h
    assert covered == width * height
    assert red > 0.9 * covered, "the desktop shows its red background"


async def test_rfb_through_the_gateway_with_a_bearer_token(
    relay_gateway: GatewayServer, desktop: Desktop, db_engine: AsyncEngine, owner: Owner
) -> None:
    instance_id = await add_instance(db_engine, owner.id, vnc_port=desktop.vnc_port)
    async with ws_connect(
        f"{relay_gateway.ws_url}/api/instances/{instance_id}/vnc", additional_headers=owner.bearer
    ) as ws:
        await rfb_session(ws, desktop)


async def test_rfb_through_the_gateway_like_novnc(
    gateway: GatewayServer,
    desktop: Desktop,
    db_engine: AsyncEngine,
    owner: Owner,
    http: httpx.AsyncClient,
) -> None:
    """A browser: a ticket from the API in the URL, an allowed Origin, `binary` asked for."""
    instance_id = await add_instance(db_engine, owner.id, vnc_port=desktop.vnc_port)
    ticket = await ticket_for(http, owner, instance_id, "vnc")
    async with ws_connect(
        f"{gateway.ws_url}/api/instances/{instance_id}/vnc?ticket={ticket}",
        origin=ORIGIN,
        subprotocols=["binary"],
    ) as ws:
        assert ws.subprotocol == "binary"
        await rfb_session(ws, desktop)
