"""The CLI's own parts: reading an event stream, tables, and the credentials file."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from cloudbot_cli import config
from cloudbot_cli.api import _sse
from cloudbot_cli.app import _table

pytestmark = pytest.mark.fast


def test_event_streams_are_read_with_ids_names_and_data() -> None:
    lines = [
        ": ping",
        "id: 7",
        "event: state",
        'data: {"state": "running"}',
        "",
        "event: idle_warning",
        "id: 8",
        'data: {"state": "running",',
        'data:  "reason": "soon"}',
        "",
        "",
    ]
    assert list(_sse(iter(lines))) == [
        (7, "state", {"state": "running"}),
        (8, "idle_warning", {"state": "running", "reason": "soon"}),
    ]


def test_tables_align_and_show_missing_values_as_blank(capsys: pytest.CaptureFixture) -> None:
    _table([{"name": "desk", "state": "running"}, {"name": "a", "state": None}], ("name", "state"))
    assert capsys.readouterr().out.splitlines() == [
        "NAME  STATE",
        "desk  running",
        "a",
    ]


def test_credentials_are_written_for_their_owner_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    monkeypatch.delenv("CLOUDBOT_TOKEN", raising=False)
    monkeypatch.delenv("CLOUDBOT_API_URL", raising=False)
    path = config.save(config.Credentials("http://api.test", "cbp_x"))
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert json.loads(path.read_text()) == {"api_url": "http://api.test", "token": "cbp_x"}
    assert config.load() == config.Credentials("http://api.test", "cbp_x")
    monkeypatch.setenv("CLOUDBOT_TOKEN", "cbp_from_env")
    assert config.load("http://other.test/").token == "cbp_from_env"
    assert config.load("http://other.test/").api_url == "http://other.test"
    assert config.forget()
    assert not path.exists()
