"""The web console in a real browser against the whole local stack: Debian's Chromium,
driven by playwright-core (console.mjs), on the page the API serves, with a real worker
running real local desktops (LOCAL_DEV_MODE) and the real gateway.

A person signs up, adds, replaces and removes provider keys, creates a machine of a size
the picker offers and sees it turn running and its health change (its VNC server frozen
and thawed) without reloading, opens its desktop (the canvas shows the real screen, what
they type runs in its terminal, view only keeps pointer and keys off it, Ctrl-Alt-Del
arrives as those keys), copies text both ways through the clipboard, talks to the agent,
reloads and a new tab (still signed in), rides out a gateway restart (the desktop
reconnects with a fresh ticket), stops (racing another client's stop: the 409 is said in
the row), starts and deletes the machine, and signs out everywhere. The same again on a
phone-sized screen (390x844), with no sideways scroll on any screen. Screenshots of each
screen go to .test-artifacts/console/.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import struct
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from cloudbot_common import procfs
from cloudbot_common.sizes import offered_sizes
from tests.support.clients import fake_client_address
from tests.support.gateway import gateway_env
from tests.support.harness import (
    FAST_RETRIES,
    kill_local_machines,
    machine_group,
    machine_processes,
    provisioner,
)
from tests.support.leaks import SECRETS
from tests.support.processes import PYTHON, free_port, http_ok, running

pytestmark = pytest.mark.vnc

ROOT = Path(__file__).resolve().parents[2]
PLAYWRIGHT = ROOT / "web" / "node_modules" / "playwright-core" / "index.mjs"
AXE = ROOT / "web" / "node_modules" / "axe-core" / "axe.min.js"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = ROOT / ".test-artifacts" / "console"
# A whole run in the browser, machine start-ups included, on a busy 2-CPU machine.
RUN_TIMEOUT_SECONDS = 300
# Sizes of this stack's own, so that the picker can only show them from GET /api/sizes.
SIZES = {"desk": "t3.small", "studio": "t3.xlarge", "workshop": "c7i.2xlarge"}
# The screens the run saves a screenshot of.
SCREENS = {
    "signin", "confirm-remove-key", "keys", "machines", "desktop", "desktop-clipboard",
    "desktop-reconnected", "stopped", "signed-out", "rate-limited",
}  # fmt: skip


class Stack:
    def __init__(
        self, env: dict[str, str], api_url: str, gateway_port: int, machines: Path
    ) -> None:
        self.env = env
        self.api_url = api_url
        self.gateway_port = gateway_port
        self.machines = machines

    def signal_desktop(self, instance_id: str, signum: signal.Signals) -> None:
        """Signal the machine's VNC server (SIGSTOP: it stops answering, as a hung one)."""
        processes = machine_processes(machine_group(self.machines / instance_id))
        [vnc] = [p for p in processes if (procfs.cmdline(p) or [b""])[0].endswith(b"x11vnc")]
        os.kill(vnc, signum)

    def gateway(self) -> contextlib.AbstractContextManager[object]:
        return running(
            "gateway-console",
            [PYTHON, "-m", "cloudbot_gateway"],
            gateway_env(self.env, self.gateway_port),
            ready=http_ok(f"http://127.0.0.1:{self.gateway_port}/readyz"),
        )


@pytest.fixture(scope="module")
def stack(base_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """API (serving the console), gateway and a worker with local desktops."""
    if not Path(CHROMIUM).exists():
        pytest.fail("Chromium is missing: apt-get install chromium fonts-dejavu-core")
    state = tmp_path_factory.mktemp("console")
    api_port, gateway_port = free_port(), free_port()
    api_url = f"http://127.0.0.1:{api_port}"
    env = {
        **base_env,
        **FAST_RETRIES,
        "LOCAL_DEV_MODE": "true",
        "LOCAL_STATE_DIR": str(state / "instances"),
        "INSTANCE_SIZES": ",".join(f"{name}={kind}" for name, kind in SIZES.items()),
        "DEFAULT_INSTANCE_SIZE": "desk",
        "LOCAL_PORT_RANGE_START": str(30000 + secrets.randbelow(20000)),
        "PUBLIC_API_URL": api_url,
        "PUBLIC_GATEWAY_URL": f"ws://127.0.0.1:{gateway_port}",
        "ALLOWED_WS_ORIGINS": api_url,
        "MAX_LIVE_INSTANCES_PER_USER": "1",
        # The restart in the middle of the run should not wait for open desktops.
        "GATEWAY_DRAIN_TIMEOUT_SECONDS": "1",
    }
    stack = Stack(env, api_url, gateway_port, state / "instances")
    try:
        with (
            running(
                "api-console",
                [PYTHON, "-m", "cloudbot_api"],
                {**env, "API_PORT": str(api_port)},
                ready=http_ok(f"{api_url}/healthz"),
            ),
            provisioner(env, state, name="console-worker"),
        ):
            yield stack
    finally:
        kill_local_machines(state / "instances")


async def drive(stack: Stack, viewport: str) -> dict[str, object]:
    """Run console.mjs at this viewport; restart the gateway when it asks."""
    email = f"console-{secrets.token_hex(6)}@example.com"
    password = "console passphrase " + secrets.token_urlsafe(10)
    keys = ["sk-ant-" + secrets.token_hex(20), "sk-ant-" + secrets.token_hex(20)]
    keys.append("sk-" + secrets.token_hex(20))
    SECRETS.add(password, *keys)
    artifacts = ARTIFACTS / viewport
    shutil.rmtree(artifacts, ignore_errors=True)
    artifacts.mkdir(parents=True)
    driver = await asyncio.create_subprocess_exec(
        "node",
        str(Path(__file__).with_name("console.mjs")),
        env={
            **os.environ,
            "PLAYWRIGHT_CORE": str(PLAYWRIGHT),
            "AXE": str(AXE),
            "CHROMIUM": CHROMIUM,
            "API_URL": stack.api_url,
            "VIEWPORT": viewport,
            "EMAIL": email,
            "PASSWORD": password,
            "KEYS": ",".join(keys),
            "ARTIFACTS": str(artifacts),
            "CLIENT_ADDRESS": fake_client_address(),
            "FOREIGN_WS": f"ws://127.0.0.1:{free_port()}/",
            # The times the agent panel shows, in a known zone.
            "TZ": "UTC",
        },
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert driver.stdin is not None
    assert driver.stdout is not None
    assert driver.stderr is not None
    result: dict[str, object] | None = None
    gateway = stack.gateway()
    gateway.__enter__()
    try:
        async with asyncio.timeout(RUN_TIMEOUT_SECONDS):
            while line := (await driver.stdout.readline()).decode().strip():
                message = json.loads(line)
                if "result" in message:
                    result = message["result"]
                    continue
                if message["ask"] == "restart-gateway":
                    # The desktop is open: the gateway goes away and comes back.
                    gateway.__exit__(None, None, None)
                    gateway = stack.gateway()
                    gateway.__enter__()
                elif message["ask"] == "pause-desktop":
                    stack.signal_desktop(message["instance"], signal.SIGSTOP)
                elif message["ask"] == "resume-desktop":
                    stack.signal_desktop(message["instance"], signal.SIGCONT)
                driver.stdin.write(b"done\n")
                await driver.stdin.drain()
            err = (await driver.stderr.read()).decode()
            await driver.wait()
    finally:
        if driver.returncode is None:
            driver.kill()
            await driver.wait()
        gateway.__exit__(None, None, None)
    assert driver.returncode == 0, err[-4000:]
    assert result is not None, err[-4000:]
    return result


def png_size(path: Path) -> tuple[int, int]:
    """Width and height from a PNG's header."""
    header = path.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n", path
    width, height = struct.unpack(">II", header[16:24])
    return width, height


@pytest.mark.parametrize("viewport", ["1280x800", "390x844"])
async def test_a_person_does_everything_in_the_console(stack: Stack, viewport: str) -> None:
    result = await drive(stack, viewport)
    checks = result["checks"]
    assert isinstance(checks, dict)
    assert checks["signinTabOrder"] == ["signin-email", "signin-password", "Sign in"]
    # Signed in without a token anywhere scripts could read it later.
    assert checks["storage"] == {"localStorage": 0, "sessionStorage": 0}
    assert "cloudbot_refresh" not in str(checks["documentCookie"])
    # Keys: only masked hints, and the list follows add, replace and remove.
    assert checks["keyHints"][0] != checks["keyHints"][1]
    assert not any(secret in json.dumps(checks) for secret in SECRETS.values)
    assert checks["keysAfterRemove"] == ["anthropic"]
    # The size picker offers the stack's sizes, as GET /api/sizes lists them (not the
    # page's fallback names), and the size picked is the one the API records.
    assert checks["sizeOptions"] == [
        [s.name, f"{s.name} ({s.cpus} CPU, {s.memory_mib / 1024:g} GiB, {s.instance_type})"]
        for s in offered_sizes(SIZES)
    ]
    assert checks["sizeDefault"] == "desk"
    assert checks["sizeChosen"] == "studio"
    assert checks["recordedSize"] == "studio"
    assert checks["rowName"] == "my desk · studio"
    # The machine turned running on the page by itself (the stream may be ahead of the
    # create's answer, so the first state shown may be provisioning): no reload, no polling.
    assert checks["statesSeen"][0] in {"pending", "provisioning"}
    assert checks["statesSeen"][-1] == "running"
    assert checks["navigations"] == 1
    assert checks["listRequests"] == 0
    # Its health, live from the stream too: unknown until the machine reports (its first
    # report may find the desktop still starting), up, down while its VNC server does not
    # answer, up again; and still no list read.
    health = checks["healthSeen"]
    assert health[0] == "desktop unknown, agent unknown", health
    assert health[-3:] == [
        "desktop up, agent up", "desktop down, agent up", "desktop up, agent up",
    ], health  # fmt: skip
    assert checks["listRequestsAfterHealth"] == 0
    # The desktop: the real screen (its background and its terminal), typed input runs.
    assert checks["screen"]["background"] > 0.3
    assert checks["screen"]["colours"] >= 2
    assert checks["typedCommandRan"] > 0.3
    # The clipboard both ways.
    assert "CloudBot instance" in str(checks["clipboardFromMachine"])
    assert checks["pastedCommandRan"] > 0.3
    # View only kept the pointer and the keys off the machine: the command typed after it
    # ran as typed, in the terminal. Ctrl-Alt-Del reached the shell as Delete with Control
    # and Alt held. Full screen shows the screen alone; unscaled, the canvas is the remote
    # screen's own size (1280 px), scrolled in place.
    assert checks["viewOnlyOn"] == "true"
    assert checks["afterViewOnly"] > 0.3
    assert checks["viewOnlyPressed"] == "false"
    assert checks["ctrlAltDel"] > 0.3
    assert checks["fullscreen"] == "screen-area"
    assert checks["unscaledWidth"] == 1280
    # The agent answered beside the desktop, and on a laptop screen it is in view. The
    # panel says who said what, and when (the time shown, and the full one in the markup).
    assert checks["agentSaid"] == [checks["said"]]
    transcript = checks["transcript"]
    assert [(m["who"], m["text"]) for m in transcript[1:]] == [
        ("You", checks["said"]), ("Agent", checks["said"]),
    ]  # fmt: skip
    assert transcript[0]["who"] == "CloudBot"
    assert re.fullmatch(r"cloudbot-agent \S+ is here\.", transcript[0]["text"])
    opened, answered = (datetime.fromtimestamp(t / 1000, UTC) for t in checks["transcriptWindow"])
    said_at = [datetime.fromisoformat(m["at"]) for m in transcript]
    assert said_at == sorted(said_at)
    assert opened - timedelta(seconds=1) <= said_at[0]
    assert said_at[-1] <= answered
    for message, at in zip(transcript, said_at, strict=True):
        assert message["shown"] in {at.strftime("%H:%M:%S"), at.strftime("%I:%M:%S %p")}
    if viewport == "1280x800":
        assert checks["agentInView"] is True
    # Reloaded, and in a new tab: still signed in; after a gateway restart, reconnected.
    assert checks["afterReload"] == "connected"
    assert checks["newTab"] == "home"
    assert checks["afterGatewayRestart"] == ["reconnecting", "connected"]
    assert checks["agentAfterRestart"] == [f"{checks['said']} again"]
    # Stop, start, delete, each seen live; the API's refusals shown where the person
    # acted: a stop that lost a race names the state the machine is in, a machine over the
    # quota names the quota. A stopped machine's health is unknown.
    assert checks["lifecycle"] == ["stopped", "running", "removed"]
    assert checks["raceError"] == "The instance is stopped; it cannot stop now."
    assert checks["healthStopped"] == "desktop unknown, agent unknown"
    assert checks["quotaError"] == (
        "Your quota is 1 live instance and you have reached it; delete one first."
    )
    # Signed out everywhere: another open tab and a reload show the sign-in form.
    assert checks["afterSignOutEverywhere"] == "auth"
    assert checks["otherTabAfterSignOut"] == "auth"
    # Too many sign-ins: refused, with the wait said where the person acted.
    assert re.fullmatch(r"Too many requests: try again in \d+ seconds?\.", checks["signinRefusal"])
    # No sideways scroll on any screen, and no accessibility violations axe can find.
    assert checks["overflow"] == {}, checks["overflow"]
    assert checks["axe"] == {}, checks["axe"]
    # The page may connect to its own origin and to the configured gateway alone: nothing
    # it does is refused, and a WebSocket elsewhere is.
    [connect_src] = [d for d in checks["csp"].split(";") if d.split()[0] == "connect-src"]
    assert connect_src.split()[1:] == ["'self'", f"ws://127.0.0.1:{stack.gateway_port}"]
    assert checks["cspViolations"] == []
    assert checks["foreignWebSocket"].get("refused") == "connect-src", checks["foreignWebSocket"]
    # A screenshot of each screen, at the screen's size.
    shots = {p.stem.partition("-")[2]: p for p in (ARTIFACTS / viewport).glob("*.png")}
    assert set(shots) == SCREENS
    assert {png_size(p) for p in shots.values()} == {tuple(map(int, viewport.split("x")))}
