"""The `cloudbot` command-line client, as installed with the workspace, runs the first
instance walk-through against the whole stack (the API, a real Celery worker, moto as
EC2): sign up, log in (a personal access token kept in a file only its owner reads), store
a key, create and wait, list, events, open, stop, start, delete."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.harness import ec2_stack
from tests.support.leaks import SECRETS

CLI = shutil.which("cloudbot") or str(Path(__file__).resolve().parents[2] / ".venv/bin/cloudbot")


@pytest.fixture(scope="module")
def api_url(base_env, broker_url, moto_url, tmp_path_factory) -> Iterator[str]:
    state = tmp_path_factory.mktemp("cli")
    with ec2_stack(base_env, broker_url, moto_url, state, "cli") as url:
        yield url


class Cli:
    def __init__(self, api_url: str, home: Path) -> None:
        self.env = {
            **os.environ,
            "CLOUDBOT_API_URL": api_url,
            "XDG_CONFIG_HOME": str(home),
            "HTTP_PROXY": "",
            "HTTPS_PROXY": "",
        }
        self.env.pop("CLOUDBOT_TOKEN", None)
        self.env.pop("DISPLAY", None)

    def run(self, *args: str, stdin: str | None = None, ok: bool = True) -> str:
        done = subprocess.run(
            [CLI, *args],
            input=stdin,
            capture_output=True,
            text=True,
            env=self.env,
            timeout=120,
            check=False,
        )
        if ok:
            assert done.returncode == 0, f"cloudbot {' '.join(args)}:\n{done.stdout}{done.stderr}"
        else:
            assert done.returncode != 0, done.stdout
            return done.stderr
        return done.stdout

    def json(self, *args: str, stdin: str | None = None) -> Any:
        return json.loads(self.run(*args, "--json", stdin=stdin))


async def test_the_cli_walks_the_first_instance_through(
    api_url: str, client: httpx.AsyncClient, tmp_path: Path
) -> None:
    cli = Cli(api_url, tmp_path / "config")
    email = f"cli-{uuid.uuid4().hex[:10]}@example.com"
    password = "correct horse battery " + uuid.uuid4().hex
    SECRETS.add(password)

    assert email in cli.run("signup", "--email", email, "--password-stdin", stdin=password + "\n")
    cli.run("login", "--email", email, "--password-stdin", stdin=password + "\n")
    creds = tmp_path / "config" / "cloudbot" / "credentials.json"
    assert stat.S_IMODE(creds.stat().st_mode) == 0o600
    token = json.loads(creds.read_text())["token"]
    SECRETS.add(token)
    assert token.startswith("cbp_")
    assert password not in creds.read_text()

    key = "sk-ant-api03-" + uuid.uuid4().hex
    SECRETS.add(key)
    cli.run("keys", "set", "anthropic", stdin=key + "\n")
    keys = cli.json("keys", "list")
    assert [k["provider"] for k in keys] == ["anthropic"]
    assert key not in json.dumps(keys)

    created = cli.json("create", "desk", "--size", "small", "--wait")
    assert created["state"] == "running"
    instance_id = created["id"]
    table = cli.run("list")
    assert table.splitlines()[0].split()[:4] == ["ID", "NAME", "SIZE", "STATE"]
    assert any(instance_id in line and "running" in line for line in table.splitlines())

    history = [json.loads(line) for line in cli.run("events", instance_id, "--json").splitlines()]
    assert [e["state"] for e in history] == ["pending", "provisioning", "running"]

    url = cli.run("open", instance_id, "--print").strip()
    assert url == f"{api_url}/app/#/desktop/{instance_id}"
    ticket_url = cli.run("open", instance_id, "--ticket", "vnc").strip()
    assert f"/api/instances/{instance_id}/vnc?ticket=cbt_" in ticket_url
    SECRETS.add(ticket_url.split("ticket=")[1])

    assert "stopped" in cli.run("stop", instance_id, "--wait")
    assert cli.json("start", instance_id, "--wait")["state"] == "running"
    # A follower started now prints what comes next as it comes, and ends after terminated.
    follower = subprocess.Popen(
        [CLI, "events", instance_id, "--follow", "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=cli.env,
    )
    assert "terminated" in cli.run("delete", instance_id, "--wait")
    out, err = follower.communicate(timeout=60)
    assert follower.returncode == 0, err
    followed = [json.loads(line)["state"] for line in out.splitlines()]
    assert followed[-2:] == ["terminating", "terminated"]
    assert followed[:7] == [
        "pending",
        "provisioning",
        "running",
        "stopping",
        "stopped",
        "starting",
        "running",
    ]
    everything = cli.json("list", "--all")
    assert [(i["id"], i["state"]) for i in everything] == [(instance_id, "terminated")]

    # Errors read as the API's own words, with a non-zero exit.
    missing = cli.run("show", str(uuid.uuid4()), ok=False)
    assert "instance_not_found" in missing or "not found" in missing.lower()

    # The login kept only the token: the password session it made was ended, and the
    # token is the account's one personal access token, revocable like any other.
    r = await client.post("/api/auth/login", json={"email": email, "password": password})
    access = r.json()["access_token"]
    SECRETS.add(access, r.json()["refresh_token"])
    tokens = (
        await client.get("/api/user/tokens", headers={"Authorization": f"Bearer {access}"})
    ).json()["items"]
    assert len(tokens) == 1
    assert tokens[0]["name"].startswith("cloudbot CLI on ")

    cli.run("logout")
    assert not creds.exists()
    assert "login" in cli.run("list", ok=False)
