"""Redaction in the logging pipeline, the leak scan, and that service logs are scanned."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import pytest

from cloudbot_common.logging import configure_logging, get_logger
from tests.support.leaks import find_leaks
from tests.support.processes import LOG_DIR

JWT = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.c2lnbmF0dXJlLXNpZ25hdHVyZQ"


@pytest.fixture
def captured():
    out = io.StringIO()
    configure_logging("test", level="INFO", json_output=True, stream=out)
    yield lambda: [json.loads(line) for line in out.getvalue().splitlines() if line]
    logging.getLogger().handlers.clear()


@pytest.mark.fast
def test_secret_fields_and_token_text_are_redacted(captured):
    log = get_logger("t")
    log.info(
        "signing in",
        password="hunter2-hunter2",
        api_key="sk-ant-abcdefghijklmnop",
        authorization=f"Bearer {JWT}",
        nested={"refresh_token": "r" * 30, "ok": "visible"},
        user_id="u1",
    )
    log.info(f"GET /api/instances/1/vnc?ticket=cbt_{'x' * 30}&a=b")
    logging.getLogger("std").warning("header was Bearer %s", JWT)
    lines = captured()
    text = json.dumps(lines)
    for secret in ("hunter2-hunter2", "sk-ant-abcdefghijklmnop", JWT, "r" * 30, "x" * 30):
        assert secret not in text
    assert lines[0]["user_id"] == "u1"
    assert lines[0]["nested"]["ok"] == "visible"
    assert lines[0]["password"] == "[redacted]"
    assert "ticket=[redacted]" in lines[1]["event"]
    assert lines[2]["service"] == "test"


@pytest.mark.parametrize(
    "key",
    [
        "sk-" + "A1b2C3d4E5f6G7h8I9j0K1l2M3n4O5p6Q7r8S9t0",
        "sk-proj-" + "Ab12_Cd34-Ef56Gh78Ij90Kl12Mn34Op56",
        "sk-ant-api03-" + "Zz9_Yy8-Xx7Ww6Vv5Uu4Tt3Ss2Rr1Qq0Pp",
    ],
)
@pytest.mark.fast
def test_provider_keys_in_free_text_are_redacted(captured, key):
    log = get_logger("t")
    log.warning(f"provider refused the key {key}: invalid")
    log.info("upstream said", detail=f'{{"error": "bad key \'{key}\'"}}')
    logging.getLogger("std").error("calling provider with %s failed", key)
    lines = captured()
    assert key not in json.dumps(lines)
    assert lines[0]["event"].startswith("provider refused the key sk-")
    assert "[redacted]: invalid" in lines[0]["event"]
    # Words that merely start alike are left alone.
    log.info("task-sk-12 and desk-topology stay")
    assert captured()[-1]["event"] == "task-sk-12 and desk-topology stay"


@pytest.mark.fast
def test_leak_scan_finds_secrets_and_token_shapes(tmp_path: Path):
    (tmp_path / "clean.log").write_text('{"event": "request", "path": "/api/auth/login"}\n')
    assert find_leaks(tmp_path, ["a-registered-secret"]) == []
    (tmp_path / "a.log").write_text("oops a-registered-secret here\n")
    (tmp_path / "b.log").write_text(f"token {JWT}\n")
    (tmp_path / "c.log").write_text("credential cbc_" + "Z" * 40 + "\n")
    assert find_leaks(tmp_path, ["a-registered-secret"]) == [
        "a.log: a registered secret",
        "b.log: token-shaped text",
        "c.log: token-shaped text",
    ]


async def test_service_logs_are_written_where_the_scan_looks(http):
    # The api_server fixture's log is among the scanned files and really holds log lines,
    # so a clean scan means something. (Health probes are not access-logged: ask for
    # something else.)
    assert (await http.get("/api/auth/me")).status_code == 401
    logs = list(LOG_DIR.glob("api-*.log"))
    assert logs
    assert any('"event": "request"' in p.read_text() for p in logs)


def test_a_terminal_line_is_terse_and_json_keeps_every_field():
    """Celery's task dict and uvicorn's coloured copy of the message are left out of a
    terminal's line; production's JSON keeps them. Routine library chatter is quiet in
    both, its warnings are not."""
    for json_output in (True, False):
        out = io.StringIO()
        configure_logging("test", level="INFO", json_output=json_output, stream=out)
        try:
            logging.getLogger("celery.app.trace").info("Task x succeeded", extra={"data": {"a": 1}})
            logging.getLogger("celery.app.trace").warning("Task x failed")
            logging.getLogger("celery.beat").info("Scheduler: Sending due task outbox-relay")
            logging.getLogger("alembic.runtime.plugins").info("setup plugin alembic.x")
            logging.getLogger("app").info(
                "ready", extra={"data": {"task": "dict"}, "color_message": "\x1b[1mready"}
            )
        finally:
            logging.getLogger().handlers.clear()
        lines = out.getvalue().splitlines()
        assert len(lines) == 2, lines
        assert "failed" in lines[0]
        if json_output:
            ready = json.loads(lines[1])
            assert ready["data"] == {"task": "dict"}
            assert ready["color_message"] == "\x1b[1mready"
        else:
            assert "ready" in lines[1]
            assert "task" not in lines[1]
            assert "color_message" not in lines[1]
