"""The CloudBot agent: the machine's gate, its WebSocket endpoint, its bootstrap and its
heartbeats.

The desktop's VNC server and the agent's WebSocket listen on the machine's loopback only.
The gate is the one way in from the network: it listens on the ports the gateway connects
to, one in front of each, and admits a connection only once the peer has proved, over
fresh nonces, that it holds the instance's agent credential (HMAC-SHA256; the protocol is
described in the control plane's `cloudbot_common/security/gate.py`). Then it relays plain
bytes. A peer that cannot prove it (a neighbour on the network, a security group left
open) is closed on without a word.

The same file runs on an EC2 machine (user_data.sh ships it verbatim) and in a local
sandbox, so it depends on the standard library and `websockets` only, and on nothing of
the control plane. Configuration comes from the environment:

    CLOUDBOT_INSTANCE_ID        the instance this machine is
    CLOUDBOT_API_URL            the control plane, for bootstrap and heartbeats
    CLOUDBOT_STATE_DIR          where the credential and configuration are kept (0700)
    CLOUDBOT_AGENT_HOST/PORT    where the WebSocket listens (default 127.0.0.1:7878)
    CLOUDBOT_AGENT_WS_PATH      the WebSocket path (default /ws)
    CLOUDBOT_VNC_HOST/PORT      the desktop's VNC server (127.0.0.1:5900)
    CLOUDBOT_GATE_HOST          where the gate listens (default 0.0.0.0)
    CLOUDBOT_GATE_VNC_PORT      the gate in front of the VNC server (default 7900)
    CLOUDBOT_GATE_AGENT_PORT    the gate in front of the WebSocket (default 7901)
    CLOUDBOT_GATE_FDS           instead, listening sockets handed over: "vnc=3,agent=4"
    CLOUDBOT_API_SOCKET         reach CLOUDBOT_API_URL (http) through this Unix socket
    CLOUDBOT_BOOTSTRAP_PATH     default /api/agent/bootstrap
    CLOUDBOT_HEARTBEAT_PATH     default /api/agent/heartbeat
    CLOUDBOT_BOOTSTRAP_TOKEN    the single-use bootstrap token (first boot only), or
    CLOUDBOT_BOOTSTRAP_TOKEN_FILE  a file holding it, deleted once it has been used
    CLOUDBOT_IDENTITY_FILE      the machine's proof of identity, {"document", "signature"},
                                written by the host (local sandboxes); without it, the
                                EC2 instance identity document and signature from IMDSv2
    CLOUDBOT_IMDS_URL           the instance metadata service (http://169.254.169.254)
    CLOUDBOT_AGENT_TOKEN        the credential the gateway presents, when the machine
                                knows it before bootstrap (local sandboxes), or
    CLOUDBOT_AGENT_TOKEN_FILE   a file holding it

Tokens are never logged and never put on a command line.
"""

# The machines run the distribution's Python, possibly 3.10, where asyncio.TimeoutError is
# not yet the builtin TimeoutError.
# ruff: noqa: UP041

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import http.client
import json
import logging
import os
import random
import signal
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from http import HTTPStatus
from pathlib import Path
from typing import Any

from websockets.asyncio.server import ServerConnection, serve
from websockets.http11 import Request, Response

log = logging.getLogger("cloudbot.agent")

AGENT_VERSION = "0.1.0"
_STATE_FILE = "agent.json"
_CONFIG_FILE = "config.json"
# A refused token will not become valid by asking again.
_REFUSED = {401, 403, 404, 410}
BOOTSTRAP_TIMEOUT_SECONDS = 120.0

_GATE_GREETING = b"CLOUDBOT-GATE/1\n"
_NONCE_BYTES = 32
# A peer has this long to prove itself; past it, or past this many unproven connections
# at once, the gate closes on it.
_GATE_TIMEOUT = 5.0
_GATE_MAX_UNPROVEN = 64
_RELAY_CHUNK = 256 * 1024


@dataclass(frozen=True)
class AgentConfig:
    instance_id: str
    api_url: str
    state_dir: Path
    host: str
    port: int
    ws_path: str
    vnc_host: str
    vnc_port: int
    bootstrap_path: str
    heartbeat_path: str
    gate_host: str
    gate_vnc_port: int
    gate_agent_port: int
    # Listening sockets handed over by whoever started us, by what they front.
    gate_fds: dict[str, int]

    @classmethod
    def from_env(cls) -> AgentConfig:
        env = os.environ
        return cls(
            instance_id=env["CLOUDBOT_INSTANCE_ID"],
            api_url=env["CLOUDBOT_API_URL"].rstrip("/"),
            state_dir=Path(env.get("CLOUDBOT_STATE_DIR", "/var/lib/cloudbot")),
            host=env.get("CLOUDBOT_AGENT_HOST", "127.0.0.1"),
            port=int(env.get("CLOUDBOT_AGENT_PORT", "7878")),
            ws_path=env.get("CLOUDBOT_AGENT_WS_PATH", "/ws"),
            vnc_host=env.get("CLOUDBOT_VNC_HOST", "127.0.0.1"),
            vnc_port=int(env.get("CLOUDBOT_VNC_PORT", "5900")),
            bootstrap_path=env.get("CLOUDBOT_BOOTSTRAP_PATH", "/api/agent/bootstrap"),
            heartbeat_path=env.get("CLOUDBOT_HEARTBEAT_PATH", "/api/agent/heartbeat"),
            gate_host=env.get("CLOUDBOT_GATE_HOST", "0.0.0.0"),
            gate_vnc_port=int(env.get("CLOUDBOT_GATE_VNC_PORT", "7900")),
            gate_agent_port=int(env.get("CLOUDBOT_GATE_AGENT_PORT", "7901")),
            gate_fds={
                name: int(fd)
                for name, _, fd in (
                    item.partition("=")
                    for item in env.get("CLOUDBOT_GATE_FDS", "").split(",")
                    if item
                )
            },
        )


def _gate_proof(key: str, role: bytes, gate_nonce: bytes, gateway_nonce: bytes) -> bytes:
    return hmac.new(
        key.encode(), role + b"\0" + gate_nonce + gateway_nonce, hashlib.sha256
    ).digest()


class Gate:
    """Admits a connection to a loopback service once the peer proves it holds the key.

    `key` returns the instance's agent credential, or None before the machine knows it
    (then nobody is admitted). Every refusal looks the same: the connection closes, having
    received only the greeting and the gate's nonce.
    """

    def __init__(self, key: Callable[[], str | None]) -> None:
        self._key = key
        self._unproven = 0

    async def admit(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, host: str, port: int
    ) -> None:
        upstream: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        try:
            if self._unproven >= _GATE_MAX_UNPROVEN:
                return
            self._unproven += 1
            try:
                upstream = await asyncio.wait_for(
                    self._prove(reader, writer, host, port), _GATE_TIMEOUT
                )
            finally:
                self._unproven -= 1
            if upstream is not None:
                await _relay(reader, writer, *upstream)
        except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError):
            pass
        finally:
            for w in (writer, upstream[1] if upstream else None):
                if w is not None:
                    w.close()

    async def _prove(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, host: str, port: int
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
        gate_nonce = os.urandom(_NONCE_BYTES)
        writer.write(_GATE_GREETING + gate_nonce)
        answer = await reader.readexactly(2 * _NONCE_BYTES)
        gateway_nonce, presented = answer[:_NONCE_BYTES], answer[_NONCE_BYTES:]
        key = self._key()
        expected = _gate_proof(key or "", b"gateway", gate_nonce, gateway_nonce)
        if not hmac.compare_digest(presented, expected) or key is None:
            return None
        upstream = await asyncio.open_connection(host, port)
        writer.write(_gate_proof(key, b"gate", gate_nonce, gateway_nonce))
        return upstream


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while True:
        data = await reader.read(_RELAY_CHUNK)
        if not data:
            return
        writer.write(data)
        await writer.drain()


async def _relay(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    up_reader: asyncio.StreamReader,
    up_writer: asyncio.StreamWriter,
) -> None:
    """Both directions until either ends."""
    pumps = [
        asyncio.ensure_future(_pipe(reader, up_writer)),
        asyncio.ensure_future(_pipe(up_reader, writer)),
    ]
    try:
        await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for pump in pumps:
            pump.cancel()
        await asyncio.gather(*pumps, return_exceptions=True)


class Agent:
    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.state: dict[str, Any] = self._load_state()
        # Known before bootstrap on a local sandbox; otherwise learnt from the bootstrap.
        self.agent_token: str | None = _secret("CLOUDBOT_AGENT_TOKEN") or self.state.get(
            "agent_token"
        )
        # What heartbeats report for idle stop: until when a task runs, when one last ran.
        self.busy_until = 0.0
        self.last_active: float | None = None

    # --- WebSocket endpoint -------------------------------------------------------------

    def process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        path = request.path.split("?", 1)[0]
        if path == "/healthz":
            return connection.respond(HTTPStatus.OK, "ok\n")
        if path != self.config.ws_path:
            return connection.respond(HTTPStatus.NOT_FOUND, "not found\n")
        if self.agent_token is None:
            return connection.respond(HTTPStatus.SERVICE_UNAVAILABLE, "not bootstrapped yet\n")
        expected = f"Bearer {self.agent_token}"
        presented = request.headers.get("Authorization", "")
        if not _constant_time_equal(presented, expected):
            response = connection.respond(HTTPStatus.UNAUTHORIZED, "unauthorized\n")
            response.headers["WWW-Authenticate"] = "Bearer"
            return response
        return None

    async def handle(self, ws: ServerConnection) -> None:
        """Says hello, then echoes: the smallest agent a gateway and a browser can talk to.
        `/work <seconds>` stands for a task that long: the heartbeats report the agent as
        working until it is done, which holds off idle stop as a real agent's tasks do."""
        await ws.send(
            json.dumps(
                {
                    "type": "hello",
                    "instance_id": self.config.instance_id,
                    "agent": "cloudbot-agent",
                    "version": AGENT_VERSION,
                }
            )
        )
        async for message in ws:
            self.last_active = time.time()
            if isinstance(message, str) and message.startswith("/work "):
                seconds = _task_seconds(message)
                self.busy_until = max(self.busy_until, time.time() + seconds)
                await ws.send(json.dumps({"type": "working", "seconds": seconds}))
            else:
                await ws.send(message)

    def activity(self) -> dict[str, Any]:
        """Whether a task runs now and when the agent last did something."""
        now = time.time()
        moments = [m for m in (self.last_active, min(self.busy_until, now)) if m]
        last = max(moments) if moments else None
        return {
            "working": now < self.busy_until,
            "last_active_at": (
                datetime.fromtimestamp(last, UTC).isoformat() if last is not None else None
            ),
        }

    # --- Bootstrap and heartbeats -------------------------------------------------------

    async def bootstrap(self) -> bool:
        """Exchanges the bootstrap token for the credential and configuration, once."""
        if self.state.get("credential"):
            return True
        token = _secret("CLOUDBOT_BOOTSTRAP_TOKEN")
        if token is None:
            log.warning("no bootstrap token and no saved credential: heartbeats are off")
            return False
        url = self.config.api_url + self.config.bootstrap_path
        delay = 1.0
        while True:
            # The token alone is not enough: the control plane also wants proof of which
            # machine this is. Without one (IMDS not answering yet), ask again later rather
            # than spend a refusal.
            proof = await asyncio.to_thread(identity_proof)
            if proof is None:
                status, body = 0, None
            else:
                # The token works once: an answer lost to a timeout cannot be asked for
                # again, so wait for it as long as a slow control plane may take.
                status, body = await asyncio.to_thread(
                    _post_json, url, token, proof, BOOTSTRAP_TIMEOUT_SECONDS
                )
            if status == 200 and isinstance(body, dict) and body.get("credential"):
                self._save(body)
                _forget_bootstrap_token()
                log.info("bootstrapped", extra={"instance_id": self.config.instance_id})
                return True
            if status in _REFUSED:
                log.error("bootstrap token refused (status %s)", status)
                _forget_bootstrap_token()
                return False
            log.warning("bootstrap failed (status %s); retrying in %.0fs", status, delay)
            await asyncio.sleep(delay * random.uniform(0.5, 1.0))  # noqa: S311 - jitter
            delay = min(delay * 2, 30.0)

    async def heartbeats(self) -> None:
        if not await self.bootstrap():
            return
        url = urllib.parse.urljoin(
            self.config.api_url + "/",
            str(self.state.get("heartbeat_url") or self.config.heartbeat_path),
        )
        interval = float(self.state.get("heartbeat_interval_seconds") or 30)
        credential = str(self.state["credential"])
        reported: bool | None = None
        next_beat = 0.0
        while True:
            desktop = await self.desktop_healthy()
            if desktop != reported or time.monotonic() >= next_beat:
                health = {"desktop": desktop, "agent": True, **self.activity()}
                status, _ = await asyncio.to_thread(_post_json, url, credential, health)
                if status not in (200, 202, 204):
                    log.warning("heartbeat answered %s", status)
                reported, next_beat = desktop, time.monotonic() + interval
            # While the desktop is down (it starts beside the agent), look every second and
            # report it up at once, not an interval later; once up, beat every interval.
            wait = max(0.0, next_beat - time.monotonic())
            await asyncio.sleep(wait if desktop else min(1.0, wait))

    async def desktop_healthy(self) -> bool:
        """The desktop is up when its VNC server greets like one (`RFB 003.00x`)."""
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(self.config.vnc_host, self.config.vnc_port), 2
            )
        except (OSError, asyncio.TimeoutError):
            return False
        try:
            greeting = await asyncio.wait_for(reader.readexactly(12), 2)
            return greeting.startswith(b"RFB ")
        except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError):
            return False
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    # --- State on the machine's disk ----------------------------------------------------

    def _load_state(self) -> dict[str, Any]:
        try:
            data = json.loads((self.config.state_dir / _STATE_FILE).read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def _save(self, body: dict[str, Any]) -> None:
        self.config.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        state = {
            "credential": body["credential"],
            "agent_token": body.get("agent_token"),
            "heartbeat_url": body.get("heartbeat_url"),
            "heartbeat_interval_seconds": body.get("heartbeat_interval_seconds"),
        }
        write_private(self.config.state_dir / _STATE_FILE, json.dumps(state))
        # The CloudBot configuration, provider keys included, for the agent's own use.
        write_private(self.config.state_dir / _CONFIG_FILE, json.dumps(body.get("config") or {}))
        self.state = state
        if body.get("agent_token"):
            self.agent_token = str(body["agent_token"])


def _task_seconds(message: str) -> float:
    try:
        seconds = float(message.split(maxsplit=1)[1])
    except (IndexError, ValueError):
        return 0.0
    return min(max(seconds, 0.0), 24 * 3600.0)


def _constant_time_equal(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode(), b.encode())


def _secret(name: str) -> str | None:
    """The variable `name`, or the content of the file that `name`_FILE names."""
    value = os.environ.get(name)
    if value:
        return value
    path = os.environ.get(name + "_FILE")
    if path:
        with contextlib.suppress(OSError):
            return Path(path).read_text().strip() or None
    return None


def identity_proof() -> dict[str, Any] | None:
    """{"identity_document", "identity_signature"}: the file the host wrote, or else the
    EC2 instance identity document and its signature as IMDSv2 gives them (the document's
    bytes untouched: the signature is over them). None: not to be had now."""
    path = os.environ.get("CLOUDBOT_IDENTITY_FILE")
    if path:
        try:
            data = json.loads(Path(path).read_text())
            return {"identity_document": data["document"], "identity_signature": data["signature"]}
        except (OSError, ValueError, KeyError, TypeError):
            return None
    imds = os.environ.get("CLOUDBOT_IMDS_URL", "http://169.254.169.254").rstrip("/")
    try:
        token_request = urllib.request.Request(  # noqa: S310 - the metadata service
            imds + "/latest/api/token",
            method="PUT",
            headers={"X-aws-ec2-metadata-token-ttl-seconds": "300"},
        )
        with urllib.request.urlopen(token_request, timeout=5) as response:  # noqa: S310
            imds_token = response.read().decode()
        fetched = []
        for leaf in ("document", "signature"):
            request = urllib.request.Request(  # noqa: S310 - the metadata service
                f"{imds}/latest/dynamic/instance-identity/{leaf}",
                headers={"X-aws-ec2-metadata-token": imds_token},
            )
            with urllib.request.urlopen(request, timeout=5) as response:  # noqa: S310
                fetched.append(response.read().decode())
    except (OSError, ValueError, http.client.HTTPException):
        log.warning("instance identity not available from the metadata service")
        return None
    return {"identity_document": fetched[0], "identity_signature": fetched[1]}


def _forget_bootstrap_token() -> None:
    os.environ.pop("CLOUDBOT_BOOTSTRAP_TOKEN", None)
    path = os.environ.get("CLOUDBOT_BOOTSTRAP_TOKEN_FILE")
    if path:
        with contextlib.suppress(OSError):
            Path(path).unlink()


def write_private(path: Path, text: str) -> None:
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    tmp.replace(path)


class _UnixHTTPConnection(http.client.HTTPConnection):
    """HTTP to the control plane through a Unix socket: a local sandbox has no network of
    its own, and its init relays this socket to the API (and nothing else)."""

    def __init__(self, host: str, path: str, timeout: float) -> None:
        super().__init__(host, timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self._path)
        self.sock = sock


def _post_over_unix_socket(
    path: str, url: str, body: bytes, headers: dict[str, str], timeout: float
) -> tuple[int, bytes]:
    parts = urllib.parse.urlsplit(url)
    connection = _UnixHTTPConnection(parts.netloc, path, timeout)
    try:
        target = parts.path + (f"?{parts.query}" if parts.query else "")
        connection.request("POST", target, body=body, headers=headers)
        response = connection.getresponse()
        return int(response.status), response.read()
    finally:
        connection.close()


def _post_json(
    url: str, bearer: str, payload: dict[str, Any], timeout: float = 10
) -> tuple[int, Any]:
    """POST JSON with a bearer token; (status, parsed body). Status 0: no answer."""
    body = json.dumps(payload).encode()
    headers = {"Authorization": f"Bearer {bearer}", "Content-Type": "application/json"}
    api_socket = os.environ.get("CLOUDBOT_API_SOCKET")
    try:
        if api_socket:
            status, raw = _post_over_unix_socket(api_socket, url, body, headers, timeout)
            if status >= 400:
                return status, None
        else:
            request = urllib.request.Request(  # noqa: S310 - the operator's API URL
                url, data=body, method="POST", headers=headers
            )
            with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310
                raw = response.read()
                status = int(response.status)
    except urllib.error.HTTPError as e:
        return e.code, None
    except (OSError, ValueError, http.client.HTTPException):
        return 0, None
    try:
        return status, json.loads(raw) if raw else None
    except ValueError:
        return status, None


async def open_gates(config: AgentConfig, gate: Gate) -> list[asyncio.Server]:
    """The gate on each port the gateway connects to, in front of its loopback service."""
    fronts = {
        "vnc": (config.gate_vnc_port, config.vnc_host, config.vnc_port),
        "agent": (config.gate_agent_port, config.host, config.port),
    }
    servers = []
    for name, (gate_port, host, port) in fronts.items():

        async def admit(
            reader: asyncio.StreamReader,
            writer: asyncio.StreamWriter,
            host: str = host,
            port: int = port,
        ) -> None:
            await gate.admit(reader, writer, host, port)

        if name in config.gate_fds:
            sock = socket.socket(fileno=config.gate_fds[name])
            servers.append(await asyncio.start_server(admit, sock=sock))
        else:
            servers.append(await asyncio.start_server(admit, config.gate_host, gate_port))
    return servers


async def main() -> None:
    config = AgentConfig.from_env()
    agent = Agent(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with serve(
        agent.handle,
        config.host,
        config.port,
        process_request=agent.process_request,
        max_size=1 << 20,
        max_queue=16,
    ):
        gates = await open_gates(config, Gate(lambda: agent.agent_token))
        log.info("agent listening", extra={"port": config.port})
        beats = asyncio.create_task(agent.heartbeats())
        await stop.wait()
        beats.cancel()
        for server in gates:
            server.close()
        with contextlib.suppress(asyncio.CancelledError):
            await beats


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    asyncio.run(main())
