"""Graceful shutdown: the API finishes a request already under way when told to stop."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import uuid

from tests.support.processes import PYTHON, free_port, http_ok, running


async def test_sigterm_lets_an_in_flight_request_finish(base_env):
    port = free_port()
    env = {**base_env, "API_PORT": str(port)}
    body = json.dumps(
        {"email": f"late-{uuid.uuid4().hex[:8]}@example.com", "password": "a long passphrase"}
    ).encode()
    with running(
        "api-shutdown",
        [PYTHON, "-m", "cloudbot_api"],
        env,
        ready=http_ok(f"http://127.0.0.1:{port}/healthz"),
    ) as api:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(
            b"POST /api/auth/signup HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
            b"X-Forwarded-For: 10.9.9.9\r\n"
            + f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
            + body[:10]
        )
        await writer.drain()
        await asyncio.sleep(0.3)  # the request is being read when the signal comes
        os.kill(api.pid, signal.SIGTERM)
        await asyncio.sleep(0.3)
        assert api.alive(), "the API must wait for the request under way"
        writer.write(body[10:])
        await writer.drain()
        response = await asyncio.wait_for(reader.read(), 20)
        writer.close()
        assert response.startswith(b"HTTP/1.1 201"), response[:200]
        # Then it exits by itself (uvicorn re-raises the signal once it is done).
        api.popen.wait(20)
        assert api.popen.returncode in (0, -signal.SIGTERM)
