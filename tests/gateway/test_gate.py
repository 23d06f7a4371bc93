"""The machine's gate in front of a real desktop, attacked the ways a peer on the network
could: no proof, a wrong one, one replayed from an earlier connection, the credential
itself sent in the clear, silence. None of them gets a byte of the desktop. And the
gateway will not relay a machine that cannot prove it knows the instance's credential."""

from __future__ import annotations

import asyncio
import os
import uuid

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from cloudbot_common.security import gate
from cloudbot_common.security.gate import GateRefused, connect_through_gate
from cloudbot_common.security.opaque import agent_credential
from cloudbot_common.settings import Settings
from tests.support.gateway import (
    Desktop,
    GatewayServer,
    Owner,
    add_instance,
    open_gate,
    refused,
)

HELLO = len(gate.GREETING) + gate.NONCE_BYTES


def _key(instance_id: uuid.UUID) -> str:
    return agent_credential(Settings().agent_token_secret.get_secret_value(), instance_id)


@pytest.fixture
async def gated_desktop(desktop: Desktop) -> tuple[int, str]:
    """A gate admitting on a fresh instance's credential, in front of the real desktop."""
    key = _key(uuid.uuid4())
    return await open_gate(desktop.vnc_port, key), key


async def _everything(reader: asyncio.StreamReader) -> bytes:
    """All the gate sends until it closes (it must close within its handshake timeout)."""
    return await asyncio.wait_for(reader.read(), 10)


async def test_the_right_proof_reaches_the_desktop(gated_desktop: tuple[int, str]) -> None:
    port, key = gated_desktop
    sock = await connect_through_gate("127.0.0.1", port, key)
    reader, writer = await asyncio.open_connection(sock=sock)
    try:
        assert await asyncio.wait_for(reader.readexactly(12), 5) == b"RFB 003.008\n"
    finally:
        writer.close()


async def test_a_peer_without_the_credential_gets_nothing(gated_desktop: tuple[int, str]) -> None:
    port, _ = gated_desktop
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        hello = await reader.readexactly(HELLO)
        assert hello.startswith(gate.GREETING)
        writer.write(os.urandom(2 * gate.NONCE_BYTES))  # a guess
        assert await _everything(reader) == b""
    finally:
        writer.close()


async def test_a_vnc_client_speaking_first_gets_nothing(gated_desktop: tuple[int, str]) -> None:
    port, key = gated_desktop
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        # What a VNC viewer or an HTTP client would send, the credential itself included.
        writer.write(b"RFB 003.008\n\x01" + f"Authorization: Bearer {key}\r\n\r\n".encode())
        rest = await _everything(reader)
        assert len(rest) == HELLO
        assert rest.startswith(gate.GREETING)
    finally:
        writer.close()


async def test_a_silent_peer_is_closed_on(gated_desktop: tuple[int, str]) -> None:
    port, _ = gated_desktop
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        assert len(await _everything(reader)) == HELLO
    finally:
        writer.close()


async def test_another_instances_credential_is_refused(gated_desktop: tuple[int, str]) -> None:
    port, _ = gated_desktop
    with pytest.raises(GateRefused):
        await connect_through_gate("127.0.0.1", port, _key(uuid.uuid4()))


async def test_a_proof_is_good_for_one_connection(gated_desktop: tuple[int, str]) -> None:
    """What an eavesdropper saw of one connection does not open the next one."""
    port, key = gated_desktop
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    hello = await reader.readexactly(HELLO)
    gateway_nonce = os.urandom(gate.NONCE_BYTES)
    seen = gateway_nonce + gate.proof(key, gate.GATEWAY, hello[len(gate.GREETING) :], gateway_nonce)
    writer.write(seen)
    assert len(await reader.readexactly(gate.PROOF_BYTES)) == gate.PROOF_BYTES  # admitted
    writer.close()

    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        await reader.readexactly(HELLO)  # a fresh nonce
        writer.write(seen)
        assert await _everything(reader) == b""
    finally:
        writer.close()


async def test_the_gateway_refuses_a_machine_that_cannot_prove_itself(
    gateway: GatewayServer, desktop: Desktop, db_engine: AsyncEngine, owner: Owner
) -> None:
    """Whatever answers at the instance's address (an address reused, an impostor) without
    the instance's credential is not relayed to the user as their desktop."""
    impostor = await open_gate(desktop.vnc_port, _key(uuid.uuid4()))
    instance_id = await add_instance(db_engine, owner.id, vnc_port=impostor, gated=False)
    response = await refused(
        f"{gateway.ws_url}/api/instances/{instance_id}/vnc", additional_headers=owner.bearer
    )
    assert response.status_code == 502
    assert b"upstream_unreachable" in response.body


async def test_the_gateway_does_not_relay_an_ungated_desktop(
    gateway: GatewayServer, desktop: Desktop, db_engine: AsyncEngine, owner: Owner
) -> None:
    """A VNC server the gateway reaches directly is no machine of ours: it does not speak
    the gate's protocol, and the gateway does not relay it."""
    instance_id = await add_instance(db_engine, owner.id, vnc_port=desktop.vnc_port, gated=False)
    response = await refused(
        f"{gateway.ws_url}/api/instances/{instance_id}/vnc", additional_headers=owner.bearer
    )
    assert response.status_code == 502
