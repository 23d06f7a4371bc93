"""The API answers: liveness, readiness and its documentation."""

import pytest

pytestmark = pytest.mark.fast


async def test_docs_and_health(http):
    assert (await http.get("/healthz")).json() == {"status": "ok"}
    r = await http.get("/readyz")
    assert r.status_code == 200, r.text
    assert (await http.get("/docs")).status_code == 200
