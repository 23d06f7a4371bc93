"""The gate: how a control plane process proves itself to a machine before any byte reaches
the machine's desktop or agent, which listen on the machine's loopback only.

Each machine's agent runs the gate on the ports the gateway connects to (one in front of
the VNC server, one in front of the agent's WebSocket). It speaks first:

    gate    -> gateway  GREETING, gate nonce (32 bytes)
    gateway -> gate     gateway nonce (32), proof(key, "gateway", both nonces) (32)
    gate    -> gateway  proof(key, "gate", both nonces) (32), then plain bytes both ways

The key is the instance's agent credential (`opaque.agent_credential`), which the gateway
derives and the machine received at bootstrap; it never crosses the wire. Fresh nonces on
both sides make every proof good for one connection only, and the gate's own proof tells
the gateway it reached the instance's machine and not whatever now answers at its address.
A gate that is not convinced closes the connection without a word, whatever was wrong.
The machine's side is `cloudbot_provisioner/machine/agent.py` (which depends on nothing
of the control plane, so it spells the same protocol out again).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import os
import socket

GREETING = b"CLOUDBOT-GATE/1\n"
NONCE_BYTES = 32
PROOF_BYTES = 32
GATEWAY = b"gateway"
GATE = b"gate"


class GateRefused(ConnectionError):
    """The gate closed without admitting us, or its proof was wrong."""


def proof(key: str, role: bytes, gate_nonce: bytes, gateway_nonce: bytes) -> bytes:
    """HMAC-SHA256 of the role and both nonces under the instance's agent credential."""
    message = role + b"\0" + gate_nonce + gateway_nonce
    return hmac.new(key.encode(), message, hashlib.sha256).digest()


async def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    """Exactly `n` bytes and not one more: what follows belongs to the relay."""
    loop = asyncio.get_running_loop()
    data = bytearray()
    while len(data) < n:
        chunk = await loop.sock_recv(sock, n - len(data))
        if not chunk:
            raise GateRefused("the gate closed the connection")
        data += chunk
    return bytes(data)


async def pass_gate(sock: socket.socket, key: str) -> None:
    """Prove `key` to the gate at the other end of the connected non-blocking `sock` and
    check the gate's proof of it; afterwards `sock` carries the service's plain bytes.

    The caller bounds the time it may take."""
    hello = await _recv_exactly(sock, len(GREETING) + NONCE_BYTES)
    if not hello.startswith(GREETING):
        raise GateRefused("no gate answered")
    gate_nonce = hello[len(GREETING) :]
    gateway_nonce = os.urandom(NONCE_BYTES)
    ours = proof(key, GATEWAY, gate_nonce, gateway_nonce)
    await asyncio.get_running_loop().sock_sendall(sock, gateway_nonce + ours)
    theirs = await _recv_exactly(sock, PROOF_BYTES)
    if not hmac.compare_digest(theirs, proof(key, GATE, gate_nonce, gateway_nonce)):
        raise GateRefused("the gate does not know the instance's credential")


async def connect_through_gate(host: str, port: int, key: str) -> socket.socket:
    """A non-blocking TCP socket to the gate at host:port (each address tried in turn),
    past the gate: what it carries next is the service's own bytes."""
    loop = asyncio.get_running_loop()
    error: OSError = OSError(f"no address for {host}")
    for family, kind, proto, _, address in await loop.getaddrinfo(
        host, port, type=socket.SOCK_STREAM
    ):
        sock = socket.socket(family, kind, proto)
        try:
            sock.setblocking(False)
            await loop.sock_connect(sock, address)
        except OSError as exc:
            sock.close()
            error = exc
            continue
        except BaseException:
            sock.close()
            raise
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            await pass_gate(sock, key)
        except BaseException:
            sock.close()
            raise
        return sock
    raise error
