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


def test_backoff_grows_exponentially_with_jitter_up_to_the_cap():
    for attempt, ceiling in [(0, 1), (1, 2), (2, 4), (3, 8), (10, 60)]:
        delays = [backoff_seconds(attempt, cap=60) for _ in range(50)]
        assert all(ceiling / 2 <= d <= ceiling for d in delays)
        assert len(set(delays)) > 1
