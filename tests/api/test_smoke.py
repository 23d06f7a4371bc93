"""The API answers: liveness, readiness and its documentation."""

import json
import uuid
from pathlib import Path

import pytest

from tests.support.processes import LOG_DIR

pytestmark = pytest.mark.fast


async def test_docs_and_health(http):
    assert (await http.get("/healthz")).json() == {"status": "ok"}
    r = await http.get("/readyz")
    assert r.status_code == 200, r.text
    assert (await http.get("/docs")).status_code == 200


async def test_the_in_process_api_logs_where_the_secret_scan_looks(http, in_process_log):
    marker = f"smoke-{uuid.uuid4().hex}"
    r = await http.get("/api/auth/me", headers={"X-Request-ID": marker})
    assert r.status_code == 401
    in_process_log.flush()
    path = Path(in_process_log.name)
    assert path.parent == LOG_DIR
    assert path.suffix == ".log"
    lines = [json.loads(line) for line in path.read_text().splitlines() if marker in line]
    assert any(line["service"] == "api" and line["path"] == "/api/auth/me" for line in lines)
