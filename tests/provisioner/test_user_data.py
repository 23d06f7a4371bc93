"""The EC2 user data: a valid shell script, under EC2's size limit, carrying the agent
verbatim and no secret but the bootstrap token."""

from __future__ import annotations

import base64
import gzip
import re
import subprocess
import uuid
from importlib import resources

import pytest

from cloudbot_common.security.opaque import new_token
from cloudbot_provisioner.backends.user_data import MAX_USER_DATA_BYTES, render_user_data
from cloudbot_provisioner.tasks import backoff_seconds

pytestmark = pytest.mark.fast


def test_user_data_is_valid_bash_within_the_size_limit(tmp_path):
    token = new_token("cbb_")
    script = render_user_data(uuid.uuid4(), "https://api.example.com/", token)
    path = tmp_path / "user_data.sh"
    path.write_text(script)

    subprocess.run(["bash", "-n", str(path)], check=True)
    assert len(script.encode()) <= MAX_USER_DATA_BYTES
    assert not re.search(r"__[A-Z_]+__", script)
    assert script.count(token) == 1
    assert "API_URL=https://api.example.com\n" in script


def test_user_data_ships_the_agent_verbatim():
    script = render_user_data(uuid.uuid4(), "http://api", new_token("cbb_"))
    heredoc = re.search(r"<<'AGENT'[^\n]*\n(.*?)\nAGENT\n", script, re.DOTALL)
    assert heredoc is not None
    shipped = gzip.decompress(base64.b64decode(heredoc.group(1).replace("\n", "")))
    source = resources.files("cloudbot_provisioner.machine").joinpath("agent.py").read_bytes()
    assert shipped == source


def test_only_the_gate_listens_beyond_the_machine_s_loopback():
    script = render_user_data(uuid.uuid4(), "http://api", new_token("cbb_"))
    [vnc] = [line for line in script.splitlines() if line.startswith("ExecStart=/usr/bin/x11vnc")]
    # Password-less, so on loopback only: the gate is the way in.
    assert "-nopw" in vnc
    assert "-localhost" in vnc.split()
    env = dict(
        line.split("=", 1)
        for line in script.split("<<ENV\n", 1)[1].split("\nENV\n", 1)[0].splitlines()
    )
    assert env["CLOUDBOT_AGENT_HOST"] == "127.0.0.1"
    assert env["CLOUDBOT_VNC_HOST"] == "127.0.0.1"
    assert env["CLOUDBOT_GATE_HOST"] == "0.0.0.0"
    assert (env["CLOUDBOT_GATE_VNC_PORT"], env["CLOUDBOT_GATE_AGENT_PORT"]) == (
        "${GATE_VNC_PORT}",
        "${GATE_AGENT_PORT}",
    )
    assert "GATE_VNC_PORT=7900\n" in script
    assert "GATE_AGENT_PORT=7901\n" in script


def test_backoff_grows_exponentially_with_jitter_up_to_the_cap():
    for attempt, ceiling in [(0, 1), (1, 2), (2, 4), (3, 8), (10, 60)]:
        delays = [backoff_seconds(attempt, cap=60) for _ in range(50)]
        assert all(ceiling / 2 <= d <= ceiling for d in delays)
        assert len(set(delays)) > 1
