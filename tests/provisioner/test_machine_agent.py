"""The agent as a machine runs it (its own process, configured by environment): its
WebSocket and the desktop it fronts listen on loopback only, and the only way in from the
network is its gate, which admits the holder of the instance's agent credential and
nobody else, not even someone presenting that credential as a bearer token."""

from __future__ import annotations

import asyncio
import json
import socket
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from cloudbot_common import procfs
from cloudbot_common.instance_contract import AGENT_WS_PATH
from cloudbot_common.security.gate import GREETING, NONCE_BYTES, GateRefused, connect_through_gate
from cloudbot_common.security.opaque import agent_credential
from tests.support.leaks import SECRETS
from tests.support.processes import PYTHON, free_port, running, tcp_open

RFB = b"RFB 003.008\n"


def _outside_address() -> str | None:
    """An address of this host other than loopback: how a neighbour reaches it."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))  # no packet is sent for a UDP connect
            address = str(s.getsockname()[0])
        except OSError:
            return None
    return None if address.startswith("127.") else address


@pytest.fixture
async def desktop_port() -> AsyncIterator[int]:
    """A loopback service greeting like a VNC server."""

    async def greet(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(RFB)
        await reader.read()
        writer.close()

    server = await asyncio.start_server(greet, "127.0.0.1", 0)
    async with server:
        yield int(server.sockets[0].getsockname()[1])


class Machine:
    def __init__(self, credential: str | None, desktop_port: int, state_dir: Path) -> None:
        self.instance_id = uuid.uuid4()
        self.credential = credential
        self.ws_port, self.gate_vnc, self.gate_agent = free_port(), free_port(), free_port()
        self.env = {
            "CLOUDBOT_INSTANCE_ID": str(self.instance_id),
            "CLOUDBOT_API_URL": "http://127.0.0.1:9",  # nobody: no bootstrap, no heartbeats
            "CLOUDBOT_STATE_DIR": str(state_dir),
            "CLOUDBOT_AGENT_PORT": str(self.ws_port),
            "CLOUDBOT_VNC_PORT": str(desktop_port),
            "CLOUDBOT_GATE_VNC_PORT": str(self.gate_vnc),
            "CLOUDBOT_GATE_AGENT_PORT": str(self.gate_agent),
        }
        if credential is not None:
            (state_dir / "agent_token").write_text(credential)
            self.env["CLOUDBOT_AGENT_TOKEN_FILE"] = str(state_dir / "agent_token")

    def run(self) -> Iterator[Machine]:
        argv = [PYTHON, "-m", "cloudbot_provisioner.machine.agent"]
        with running("machine-agent", argv, self.env, ready=tcp_open(self.gate_agent)):
            yield self


@pytest.fixture
def machine(desktop_port: int, tmp_path: Path) -> Iterator[Machine]:
    credential = agent_credential("a-secret-of-this-test", uuid.uuid4())
    SECRETS.add(credential)
    yield from Machine(credential, desktop_port, tmp_path).run()


async def _hello(machine: Machine, bearer: str) -> dict[str, str]:
    assert machine.credential is not None
    sock = await connect_through_gate("127.0.0.1", machine.gate_agent, machine.credential)
    url = f"ws://127.0.0.1:{machine.gate_agent}{AGENT_WS_PATH}"
    headers = {"Authorization": f"Bearer {bearer}"}
    async with connect(url, sock=sock, additional_headers=headers, open_timeout=5) as ws:
        hello: dict[str, str] = json.loads(await asyncio.wait_for(ws.recv(), 5))
        return hello


async def test_the_websocket_and_the_desktop_listen_on_loopback_only(
    machine: Machine, desktop_port: int
) -> None:
    # 0100007F is 127.0.0.1 as /proc/net/tcp writes it; 00000000 would be every interface.
    assert procfs.tcp_listening_addresses(machine.ws_port) == {"0100007F"}
    assert procfs.tcp_listening_addresses(machine.gate_agent) == {"00000000"}
    outside = _outside_address()
    if outside is None:
        pytest.skip("this host has no address but loopback")
    with pytest.raises(ConnectionRefusedError):
        await asyncio.open_connection(outside, machine.ws_port)
    with pytest.raises(ConnectionRefusedError):
        await asyncio.open_connection(outside, desktop_port)


async def test_the_gate_admits_the_credential_to_the_desktop_and_the_agent(
    machine: Machine,
) -> None:
    assert machine.credential is not None
    sock = await connect_through_gate("127.0.0.1", machine.gate_vnc, machine.credential)
    reader, writer = await asyncio.open_connection(sock=sock)
    try:
        assert await asyncio.wait_for(reader.readexactly(len(RFB)), 5) == RFB
    finally:
        writer.close()
    hello = await _hello(machine, machine.credential)
    assert hello["instance_id"] == str(machine.instance_id)
    # Past the gate the WebSocket checks the credential again, as a bearer token.
    with pytest.raises(InvalidStatus) as refused:
        await _hello(machine, "cba_" + "0" * 64)
    assert refused.value.response.status_code == 401


async def test_the_credential_as_a_bearer_token_does_not_open_the_gate(machine: Machine) -> None:
    """A neighbour who somehow learnt the credential still has to prove it over the gate's
    nonce; sending it as a WebSocket client would gets the greeting and a closed socket."""
    outside = _outside_address() or "127.0.0.1"
    reader, writer = await asyncio.open_connection(outside, machine.gate_agent)
    try:
        request = (
            f"GET {AGENT_WS_PATH} HTTP/1.1\r\nHost: machine\r\nUpgrade: websocket\r\n"
            "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            f"Sec-WebSocket-Version: 13\r\nAuthorization: Bearer {machine.credential}\r\n\r\n"
        )
        writer.write(request.encode())
        everything = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
    assert len(everything) == len(GREETING) + NONCE_BYTES
    assert b"HTTP" not in everything


async def test_before_the_machine_knows_its_credential_nobody_is_admitted(
    desktop_port: int, tmp_path: Path
) -> None:
    for machine in Machine(None, desktop_port, tmp_path).run():
        for port in (machine.gate_vnc, machine.gate_agent):
            with pytest.raises(GateRefused):
                await connect_through_gate("127.0.0.1", port, "")
