"""The desktop page in a real browser: Debian's Chromium, driven by playwright-core, logs
in on the page the API serves, opens a machine's desktop after its access token has
expired (the page refreshes it), noVNC shows it, and the person talks to the machine's
agent beside it, both through the gateway with single-use tickets."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from cloudbot_common.security.jwt_tokens import LEEWAY_SECONDS
from tests.support.gateway import Desktop, FakeAgent, add_instance, gateway_env
from tests.support.processes import PYTHON, free_port, http_ok, running
from tests.support.users import make_user

ROOT = Path(__file__).resolve().parents[2]
PLAYWRIGHT = ROOT / "web" / "node_modules" / "playwright-core" / "index.mjs"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# Access tokens of the page's API live this long, plus the leeway of their check.
ACCESS_TTL_SECONDS = 1
EXPIRED_AFTER_MS = (ACCESS_TTL_SECONDS + LEEWAY_SECONDS + 1) * 1000


@dataclass(frozen=True)
class Site:
    url: str  # the API's, which serves the page
    gateway: str  # PUBLIC_GATEWAY_URL


@pytest.fixture(scope="module")
def site(base_env: dict[str, str]) -> Iterator[Site]:
    """The API serving the page, and a gateway that admits the page's origin."""
    api_port, gateway_port = free_port(), free_port()
    api_url = f"http://127.0.0.1:{api_port}"
    env = {
        **base_env,
        "PUBLIC_API_URL": api_url,
        "PUBLIC_GATEWAY_URL": f"ws://127.0.0.1:{gateway_port}",
        "ALLOWED_WS_ORIGINS": api_url,
    }
    with (
        running(
            "gateway-for-page",
            [PYTHON, "-m", "cloudbot_gateway"],
            gateway_env(env, gateway_port),
            ready=http_ok(f"http://127.0.0.1:{gateway_port}/readyz"),
        ),
        running(
            "api-for-page",
            [PYTHON, "-m", "cloudbot_api"],
            {**env, "API_PORT": str(api_port), "ACCESS_TOKEN_TTL_SECONDS": str(ACCESS_TTL_SECONDS)},
            ready=http_ok(f"{api_url}/healthz"),
        ),
    ):
        yield Site(api_url, env["PUBLIC_GATEWAY_URL"])


async def test_the_page_is_served(site: Site) -> None:
    async with httpx.AsyncClient(base_url=site.url) as http:
        home = await http.get("/")
        assert home.status_code == 307
        assert home.headers["location"] == "/app/"
        page = await http.get("/app/")
        assert page.status_code == 200
        assert '<script type="module" src="app.js">' in page.text
        # Only its own scripts run; the browser test below shows noVNC works under it.
        assert "default-src 'self'" in page.headers["content-security-policy"]
        csp = page.headers["content-security-policy"]
        assert "frame-ancestors 'none'" in csp
        # WebSockets to the configured gateway only, not to any ws: or wss: address.
        connect = next(d.split()[1:] for d in csp.split(";") if d.split()[0] == "connect-src")
        assert connect == ["'self'", site.gateway]
        icon = await http.get("/app/favicon.svg")
        assert icon.status_code == 200
        assert icon.headers["content-type"].startswith("image/svg+xml")
        rfb = await http.get("/app/novnc/core/rfb.js")
        assert rfb.status_code == 200
        assert "export default class RFB" in rfb.text


async def test_a_person_opens_their_desktop_in_a_browser_after_their_token_expired(
    site: Site, desktop: Desktop, agent: FakeAgent, db_engine: AsyncEngine
) -> None:
    if not Path(CHROMIUM).exists():
        pytest.fail("Chromium is missing: apt-get install chromium fonts-dejavu-core")
    async with httpx.AsyncClient(base_url=site.url) as http:
        user = await make_user(http)
        me = (await http.get("/api/auth/me", headers=user.headers)).json()
    instance_id = await add_instance(
        db_engine, uuid.UUID(me["id"]), vnc_port=desktop.vnc_port, agent_port=agent.port
    )
    agent.allow(instance_id)
    said = f"hello, agent {uuid.uuid4().hex[:8]}"
    driver = await asyncio.create_subprocess_exec(
        "node",
        str(Path(__file__).with_name("open_desktop.mjs")),
        env={
            **os.environ,
            "PLAYWRIGHT_CORE": str(PLAYWRIGHT),
            "CHROMIUM": CHROMIUM,
            "API_URL": site.url,
            "EMAIL": user.email,
            "PASSWORD": user.password,
            "INSTANCE_ID": str(instance_id),
            "IDLE_MS": str(EXPIRED_AFTER_MS),
            "SAY": said,
        },
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(90):
        out, err = await driver.communicate()
    assert driver.returncode == 0, err.decode()[-3000:]
    result = json.loads(out.decode().strip().splitlines()[-1])
    assert result["red"] > 0.9, "the canvas shows the desktop's red background"
    assert result["status"].endswith(": connected")
    # The ticket request met an expired token: one refresh (from the page's cookie), then
    # it went through.
    assert result["refreshes"] == 1
    # The agent beside the desktop (this one echoes) got the message and answered it.
    assert result["agentSaid"] == [said]
