"""`make dev` as a newcomer meets it: the README's walk-through, run exactly as written
against the stack; and the terminal at rest, which with a desktop running and every
periodic job ticking prints (next to) nothing, while what matters still shows."""

from __future__ import annotations

import json
import os
import re
import secrets
import socket
import subprocess
import textwrap
import time
from pathlib import Path

import httpx
import pytest

from tests.support.dev_stack import Stack, wait_for_state
from tests.support.leaks import SECRETS
from tests.support.processes import ROOT, http_ok, wait_for

REDIS_SLOT = "stack"
# Every periodic thing runs at least every 2 s here (by default: heartbeats every 30 s,
# the outbox relay every 10 s, the idle sweep every 30 s, the reconciler every 60 s), so
# a 30 s window sees more ticks of each than a whole default minute does.
TICK_SECONDS = 2
WINDOW_SECONDS = 30
# Lines allowed in the window: none is expected; one or two leave room for a line about
# something real (a slow request, say) on a loaded CI machine.
AT_MOST = 2

pytestmark = [pytest.mark.slow, pytest.mark.vnc]


@pytest.fixture(scope="module")
def private_env(private_env: dict[str, str]) -> dict[str, str]:
    return {
        **private_env,
        # What `make dev` runs with (.env.example), not the tests' DEBUG and origins.
        "LOG_LEVEL": "INFO",
        "ALLOWED_WS_ORIGINS": "http://127.0.0.1:8000",
        "HEARTBEAT_INTERVAL_SECONDS": str(TICK_SECONDS),
        "OUTBOX_RELAY_AFTER_SECONDS": str(TICK_SECONDS),
        "RECONCILE_INTERVAL_SECONDS": str(TICK_SECONDS),
        "IDLE_SWEEP_SECONDS": str(TICK_SECONDS),
        "WEBHOOK_RELAY_SECONDS": str(TICK_SECONDS),
    }


def log_lines(stack: Stack) -> list[str]:
    """The services' lines (honcho's own `system` lines left out)."""
    return [
        line
        for line in stack.log_text().splitlines()
        if "|" in line and not line.split("|", 1)[0].strip().endswith("system")
    ]


def signed_in(stack: Stack, address: str) -> httpx.Client:
    """A client of the stack's API, signed up and logged in as a new user."""
    client = httpx.Client(base_url=stack.api, timeout=15, headers={"X-Forwarded-For": address})
    email = f"dev-{secrets.token_hex(6)}@example.com"
    password = "correct horse battery " + secrets.token_urlsafe(12)
    signup = client.post("/api/auth/signup", json={"email": email, "password": password})
    assert signup.status_code == 201, signup.text
    tokens = client.post("/api/auth/login", json={"email": email, "password": password}).json()
    SECRETS.add(password, tokens["access_token"], tokens["refresh_token"])
    client.headers["Authorization"] = f"Bearer {tokens['access_token']}"
    return client


def test_make_dev_is_quiet_at_rest(stack: Stack) -> None:
    client = signed_in(stack, "10.9.8.9")
    instance_id = client.post("/api/instances", json={"name": "quiet desk"}).json()["id"]
    try:
        wait_for_state(client, instance_id, "running", 120, stack)

        def beat_at() -> str | None:
            health = client.get(f"/api/instances/{instance_id}").json()["health"]
            return health["last_heartbeat_at"] if health["desktop"] else None

        wait_for(lambda: beat_at() is not None, 30, "the desktop's first healthy heartbeat")
        time.sleep(TICK_SECONDS * 2)  # the last start-up lines

        before, first_beat = len(log_lines(stack)), beat_at()
        time.sleep(WINDOW_SECONDS)
        printed = log_lines(stack)[before:]
        # The window really held the routine: heartbeats came in all along.
        assert beat_at() != first_beat
        assert len(printed) <= AT_MOST, "\n".join(printed)

        # What matters still shows: a state change, with the instance it concerns.
        assert client.post(f"/api/instances/{instance_id}/stop").status_code == 202
        wait_for_state(client, instance_id, "stopped", 60, stack)
        changed = [line for line in log_lines(stack)[before:] if instance_id in line]
        assert any("stopped" in line for line in changed), "\n".join(changed)
    finally:
        client.delete(f"/api/instances/{instance_id}")
        wait_for_state(client, instance_id, "terminated", 60, stack)
        client.close()


README_API = "API=http://127.0.0.1:8000"


def readme_walkthrough() -> str:
    """The shell blocks of the README's walk-through, in order, as a person pastes them."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## Your first instance, with curl", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"^( *)```sh\n(.*?)^\1```", section, re.M | re.S)
    assert len(blocks) >= 3, "the walk-through's shell blocks"
    return "\n".join(textwrap.dedent(body) for _, body in blocks)


def test_the_readme_walkthrough_runs_as_written(stack: Stack) -> None:
    script = readme_walkthrough()
    SECRETS.add("correct horse battery staple", "sk-ant-your-key")
    # The one change: the stack's address instead of make dev's port 8000.
    assert script.count(README_API) == 1
    script = script.replace(README_API, f"API={stack.api}")
    done = subprocess.run(
        ["bash", "-c", script],
        cwd=ROOT,
        env={**os.environ, "PATH": f"{ROOT / '.venv' / 'bin'}{os.pathsep}{os.environ['PATH']}"},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    # No step was refused (every refusal is a problem document with a `code`).
    assert '"code":' not in out, out
    assert '"hint":' in out  # 2: the stored key, as a masked hint
    assert '"state": "running"' in out  # 4: the event stream reached running
    assert "RFB 003.008" in out  # 6: the desktop's VNC server answered through the gateway
    deleted = done.stdout[done.stdout.rindex('{"id"') :]  # 7: the last answer, the delete's
    assert '"state":"terminating"' in deleted, deleted


DONE = re.compile(r"done after ([0-9.]+) s of waiting and ([0-9]+) attempts")


HOLD_SECONDS = 5.0


def start_held_up(stack: Stack) -> str:
    """An instance started while its desktop cannot come up for HOLD_SECONDS (something
    else holds its VNC port on the host, as a slow boot would keep it unready): the
    start waits for the machine. Its id."""
    client = signed_in(stack, "10.9.8.10")
    instance_id = client.post("/api/instances", json={"name": "held desk"}).json()["id"]
    try:
        wait_for_state(client, instance_id, "running", 120, stack)
        assert client.post(f"/api/instances/{instance_id}/stop").status_code == 202
        wait_for_state(client, instance_id, "stopped", 60, stack)
        spec = Path(stack.env["LOCAL_STATE_DIR"], instance_id, "machine.json")
        with socket.socket() as holder:
            holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            holder.bind(("127.0.0.1", json.loads(spec.read_text())["vnc_port"]))
            holder.listen()
            assert client.post(f"/api/instances/{instance_id}/start").status_code == 202
            time.sleep(HOLD_SECONDS)
        wait_for_state(client, instance_id, "running", 60, stack)
    finally:
        client.delete(f"/api/instances/{instance_id}")
        wait_for_state(client, instance_id, "terminated", 60, stack)
        client.close()
    return instance_id


def test_flower_lists_the_commands_with_their_whole_wait(stack: Stack) -> None:
    """After the walk-through (and beat ticking every 2 s all along), Flower's list is
    the commands people asked for, each saying how it went: at the first attempt, or
    after how long a wait for its machine and how many attempts (Flower's runtime is the
    last attempt's alone). A start held up for a few seconds says so."""
    held_start = start_held_up(stack)
    r = httpx.get(f"{stack.flower}/api/tasks", auth=stack.flower_auth, timeout=10)
    assert r.status_code == 200, r.text
    tasks = list(r.json().values())
    names = {task["name"] for task in tasks}
    # The walk-through's provision, stop, start and delete.
    assert {"cloudbot.instances.provision", "cloudbot.instances.start"} <= names, names
    # Nothing but commands: no relay, reconciler, idle sweep or webhook tick.
    assert all(name.startswith("cloudbot.instances.") for name in names), names
    assert "cloudbot.instances.idle_sweep" not in names
    done = [task for task in tasks if task["state"] == "SUCCESS"]
    assert done, tasks
    # The start that waited for its desktop shows the wait as the one task's attempts.
    waited = [
        task
        for task in done
        if task["name"] == "cloudbot.instances.start" and held_start in str(task["kwargs"])
    ]
    assert len(waited) == 1, tasks
    assert waited[0]["retries"] >= 1, waited
    found = DONE.fullmatch(str(waited[0]["result"]).strip("'\""))
    assert found, waited
    assert float(found.group(1)) >= HOLD_SECONDS / 2, waited
    for task in done:
        result = str(task["result"]).strip("'\"")
        if not task["retries"]:
            assert result == "done at the first attempt", task
            continue
        found = DONE.fullmatch(result)
        assert found, task
        seconds, attempts = float(found.group(1)), int(found.group(2))
        assert attempts == task["retries"] + 1
        # The whole wait (a check every second or more) is longer than the last check.
        assert seconds >= 0.9 * (attempts - 1)
        assert seconds > float(task["runtime"] or 0)


def starts(stack: Stack) -> dict[str, int]:
    """How many times each reloading service has come up, by its own start line."""
    text = stack.log_text()
    return {
        "api": text.count("Application startup complete."),
        "gateway": text.count("gateway listening"),
        "worker": len(re.findall(r"worker\.1 .*\bready\.", text)),
    }


def test_a_saved_change_reloads_its_services_and_a_broken_one_shows_its_error(
    stack: Stack,
) -> None:
    """Saving a source file restarts the services that import it, local desktops keep
    running, and a save that breaks a service shows its error while the others (and the
    service itself, once fixed) carry on."""
    client = httpx.Client(base_url=stack.api, timeout=15, headers={"X-Forwarded-For": "10.9.8.10"})
    email = f"reload-{secrets.token_hex(6)}@example.com"
    password = "correct horse battery " + secrets.token_urlsafe(12)
    signup = client.post("/api/auth/signup", json={"email": email, "password": password})
    assert signup.status_code == 201, signup.text
    tokens = client.post("/api/auth/login", json={"email": email, "password": password}).json()
    SECRETS.add(password, tokens["access_token"], tokens["refresh_token"])
    client.headers["Authorization"] = f"Bearer {tokens['access_token']}"
    instance_id = client.post("/api/instances", json={"name": "reload desk"}).json()["id"]
    shared = ROOT / "libs" / "common" / "src" / "cloudbot_common" / "sizes.py"
    api_module = ROOT / "services" / "api" / "src" / "cloudbot_api" / "health.py"
    originals = {path: path.read_text() for path in (shared, api_module)}
    try:
        wait_for_state(client, instance_id, "running", 120, stack)
        machine = Path(stack.env["LOCAL_STATE_DIR"]) / instance_id / "machine.pid"
        desktop = machine.read_text()

        # A change to libs/common: the api, the gateway and the worker each restart.
        before = starts(stack)
        shared.write_text(originals[shared] + f"\n# saved at {time.time()}\n")
        wait_for(
            lambda: all(n > before[name] for name, n in starts(stack).items()),
            60,
            "the api, the gateway and the worker to restart",
        )
        # Putting it back is a save too: wait for that round, so that nothing is asked of
        # a service about to restart.
        middle = starts(stack)
        shared.write_text(originals[shared])
        wait_for(
            lambda: all(n > middle[name] for name, n in starts(stack).items()),
            60,
            "the services to restart again",
        )
        for url in (f"{stack.api}/readyz", f"{stack.gateway}/readyz"):
            wait_for(http_ok(url), 60, url)
        assert client.get(f"/api/instances/{instance_id}").json()["state"] == "running"

        # A broken save: the api says why and waits; the others carry on.
        shown = len(stack.log_text())
        api_module.write_text(originals[api_module] + "\ndef broken(:\n")
        wait_for(lambda: "SyntaxError" in stack.log_text()[shown:], 60, "the api's error")
        assert stack.honcho.alive()
        assert httpx.get(f"{stack.gateway}/readyz", timeout=2).status_code == 200
        # Fixed, it comes back by itself.
        api_module.write_text(originals[api_module])
        wait_for(lambda: httpx.get(f"{stack.api}/readyz", timeout=2).status_code == 200, 30, "api")
        assert client.get(f"/api/instances/{instance_id}").json()["state"] == "running"
        # The desktop ran on through all of it: the same machine, still up.
        assert machine.read_text() == desktop
        os.kill(int(desktop), 0)
    finally:
        for path, text in originals.items():
            if path.read_text() != text:
                path.write_text(text)
        client.delete(f"/api/instances/{instance_id}")
        client.close()
